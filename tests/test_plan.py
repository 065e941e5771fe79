"""`argen plan`: the memory model against measured peaks on CPU, ZeRO/TP/PP arithmetic, suggestions, errors."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from argen import cli
from argen.errors import ArgenError
from argen.launcher import plan as P
from argen.model.gpt import GPT, GPTConfig, count_parameters, gpt_config

CPU_TORCH = dict(precision="fp32", device="cpu", engine="torch")


def _measured_vs_predicted(cfg: GPTConfig, batch: int, ckpt: int) -> tuple[int, P.Estimate]:
    measured = P.measure_training_step(cfg, batch, checkpointing=ckpt, precision="fp32")
    s = P.Settings(micro_batch=batch, global_batch=batch, checkpointing=ckpt, **CPU_TORCH)
    return measured["peak"], P.estimate(cfg, P.Layout(), s)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kw,batch,ckpt", [
    (dict(n_layer=2, n_head=4, dim=128, vocab_size=512), 4, 0),                        # peak at the logits
    (dict(n_layer=3, n_head=4, dim=192, vocab_size=512, ffn_dim_multiplier=2.0), 4, 1),  # peak in a recomputed block
])
def test_prediction_within_15_percent_of_measured_peak(kw, batch, ckpt):
    cfg = GPTConfig(block_size=64, **kw)
    measured, est = _measured_vs_predicted(cfg, batch, ckpt)
    err = abs(est.total - measured) / measured
    assert err <= 0.15, f"predicted {est.total} vs measured {measured} ({err:.1%}) at {est.moment}"
    assert ("block" in est.moment) == bool(ckpt)   # the second case exercises the recompute path


def test_checkpointing_lowers_predicted_activations_and_keeps_only_block_inputs():
    cfg = GPTConfig(block_size=64, n_layer=4, n_head=4, dim=128, vocab_size=512)
    s = P.Settings(micro_batch=8, global_batch=8, **CPU_TORCH)
    off, full, every2 = (P.estimate(cfg, P.Layout(), replace(s, checkpointing=n)) for n in (0, 1, 2))
    assert full.activations_per_micro_batch < every2.activations_per_micro_batch < off.activations_per_micro_batch
    per_block = P.layer_activation_bytes(cfg, 8, 1, s)
    kept = P.checkpointed_layer_bytes(cfg, 8, s)
    assert kept == 8 * cfg.seq_len * cfg.dim * 4
    assert off.activations_per_micro_batch - full.activations_per_micro_batch == 4 * (per_block - kept)
    assert off.activations_per_micro_batch - every2.activations_per_micro_batch == 2 * (per_block - kept)


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_parameter_count_and_order_match_the_model(model_type):
    extra = dict(cls_token_num=8, caption_len=8, caption_dim=64) if model_type == "t2i" else {}
    cfg = GPTConfig(block_size=64, n_layer=2, n_head=4, dim=64, vocab_size=256, model_type=model_type, **extra)
    model = GPT(cfg)
    assert P.total_params(cfg) == count_parameters(model)
    assert P.stage_param_sizes(cfg, P.Layout(), 0) == [p.numel() for p in model.parameters()]
    # the named sizes as the reference reports them (LlamaGen's model table)
    assert P.total_params(gpt_config("GPT-B")) == 110_888_448
    assert P.total_params(gpt_config("GPT-3B")) == 3_096_659_200
    assert P.total_params(gpt_config("GPT-XL", model_type="t2i")) == 777_678_080


def test_zero_stage_arithmetic():
    cfg = gpt_config("GPT-3B")
    P_all = P.total_params(cfg)
    z = {stage: P.zero_model_states(cfg, P.Layout(dp=8, zero=stage)) for stage in range(4)}
    assert z[0] == {"parameters": 2 * P_all, "gradients": 2 * P_all, "optimizer states": 12 * P_all}
    assert z[1]["optimizer states"] == 12 * P_all // 8 and z[1]["gradients"] == 2 * P_all
    assert z[2]["gradients"] == 2 * P_all // 8 and z[2]["parameters"] == 2 * P_all
    total0, total3 = sum(z[0].values()), sum(z[3].values())
    assert abs(total3 - total0 / 8) <= 3           # stage 3 at dp=8 holds 1/8 of params + grads + optim
    fp32 = P.zero_model_states(cfg, P.Layout(dp=8, zero=0), precision="fp32")
    assert fp32 == {"parameters": 4 * P_all, "gradients": 4 * P_all, "optimizer states": 8 * P_all}
    # the full estimate carries the same sharding
    s = P.Settings(micro_batch=1, global_batch=8)
    e0, e3 = (P.estimate(cfg, P.Layout(dp=8, zero=k), s) for k in (0, 3))
    assert e3.components["parameters"] == z[3]["parameters"]
    assert e3.components["optimizer states"] == z[3]["optimizer states"]
    assert e3.total < e0.total


def test_tensor_and_pipeline_division():
    cfg = gpt_config("GPT-L")
    d, h, V = cfg.dim, cfg.ffn_hidden, cfg.vocab_size
    assert P.layer_params(cfg, 2) == (4 * d * d + 3 * d * h) // 2 + 2 * d     # norms replicated
    assert P.head_params(cfg, 4) == d + V * d // 4                            # output vocab-parallel
    # tp halves the attention/FFN activations but not the norms' and the residual's
    s = P.Settings(micro_batch=4)
    a1, a2 = P.layer_activation_bytes(cfg, 4, 1, s), P.layer_activation_bytes(cfg, 4, 2, s)
    assert a1 / 2 < a2 < a1
    # pp: the heaviest stage holds n_layer/pp blocks plus its embedding or head
    lay = P.Layout(pp=4)
    per_stage = [P.stage_params(cfg, lay, st) for st in range(4)]
    assert sum(per_stage) == P.total_params(cfg)
    assert per_stage[1] == per_stage[2] == 6 * P.layer_params(cfg)
    # 1F1B: stage 0 keeps pp micro-batches in flight when there are enough of them, the last stage one
    s = P.Settings(micro_batch=2, global_batch=64)
    stages = [P._estimate_stage(cfg, lay, s, st) for st in range(4)]
    assert [e.in_flight for e in stages] == [4, 3, 2, 1]
    few = P._estimate_stage(cfg, lay, replace(s, global_batch=4), 0)
    assert few.in_flight == 2                                                   # only 2 micro-batches exist
    assert P.estimate(cfg, lay, s).total == max(e.total for e in stages)


def test_plan_checks_the_layout_like_train():
    """The FFN and vocabulary rules of `argen train` hold in `argen plan` too: an odd vocabulary allows no TP."""
    cfg = P.model_config("GPT-B", vocab_size=16385)
    with pytest.raises(ArgenError, match="vocab_size 16385"):
        P.check_layout(cfg, P.Layout(tp=2, dp=4), gpus=8)
    P.check_layout(cfg, P.Layout(tp=1, dp=8), gpus=8)
    sugg = P.suggest(cfg, gpus=8)
    assert sugg and all(sg.layout.tp not in (2, 4) for sg in sugg)


def test_suggestions_for_gpt3b_on_64x80gb_all_fit_and_prefer_little_model_parallelism():
    cfg = gpt_config("GPT-3B")
    sugg = P.suggest(cfg, gpus=64, gpu_mem_gib=80)
    assert sugg
    usable = 80 * P.GiB * (1 - P.DEFAULT_HEADROOM)
    for sg in sugg:
        lt = sg.layout
        assert lt.tp * lt.pp * lt.dp == 64 and lt.tp <= 8
        assert cfg.n_head % lt.tp == 0 and cfg.n_layer % lt.pp == 0
        assert not (lt.pp > 1 and lt.zero > 1)
        assert sg.estimate.total <= usable
        assert sg.estimate.total == P.estimate(cfg, lt, sg.estimate.settings).total
    assert [sg.score for sg in sugg] == sorted((sg.score for sg in sugg), reverse=True)
    assert (sugg[0].layout.tp, sugg[0].layout.pp) == (1, 1)
    # a tight budget leaves only sharded / checkpointed layouts, and all of them fit
    tight = P.suggest(cfg, gpus=64, gpu_mem_gib=16)
    assert tight and all(sg.estimate.total <= 16 * P.GiB * 0.9 for sg in tight)
    assert all(sg.layout.zero > 0 or sg.layout.tp * sg.layout.pp > 1 for sg in tight)
    assert P.suggest(cfg, gpus=1, gpu_mem_gib=16) == []


@pytest.mark.parametrize("argv,needle", [
    (["--model", "GPT-3B", "--gpus", "64", "--tp", "3"], "not divisible by tp*pp"),
    (["--model", "GPT-B", "--gpus", "10", "--tp", "5"], "does not divide the 12 attention heads"),
    (["--model", "GPT-3B", "--gpus", "5", "--pp", "5"], "does not divide the 24 layers"),
    (["--model", "GPT-3B", "--gpus", "64", "--pp", "2", "--zero", "3"], "cannot be combined with pipeline"),
    (["--model", "GPT-3B", "--gpus", "8", "--activation-checkpointing", "sometimes"], "every-N"),
    (["--model", "GPT-3X", "--gpus", "8"], "unknown model"),
    (["--model", "GPT-B", "--seq", "300"], "--seq 300"),
    (["--model", "GPT-B", "--dp", "8", "--micro-batch", "3"], "not divisible by micro-batch"),
    (["--model", "GPT-B", "--gpus", "8", "--dp", "3"], "disagrees with --gpus"),
    (["--model", "custom", "--gpus", "8"], "needs --n-layer"),
])
def test_impossible_layouts_are_one_line_errors(argv, needle, capsys):
    assert cli.main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and err.startswith("argen plan: error:")
    with pytest.raises(ArgenError):
        from argen.launcher import plan_cli
        plan_cli.main(argv)


def test_cli_layout_table_suggestions_and_help(capsys):
    argv = ["plan", "--model", "GPT-3B", "--gpus", "64", "--tp", "2", "--zero", "1", "--micro-batch", "4"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for word in ("parameters", "gradients", "optimizer states", "activations", "total (peak)", "*ZeRO-1", "dp=32"):
        assert word in out
    assert cli.main(["plan", "--model", "GPT-3B", "--gpus", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fitting"] >= len(data["suggestions"]) > 0
    assert all(s["peak_bytes"] <= 72 * P.GiB for s in data["suggestions"])
    assert cli.main(["plan", "--model", "GPT-B", "--seq", "576", "--dp", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["micro_batch"] == 128 and "sequence 576" in data["model"]
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--help"])
    assert e.value.code == 0
    assert "argen plan" in capsys.readouterr().out
