"""The single-process training loop end to end: exact resume, logs and exports, training from shards on disk and
on the S3 server (c2i and t2i; the loss falls), fine-tuning at a new resolution, EMA + bf16, configs and the CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.train_utils import kept_signal_handlers, stop_at, tiny_cfg


@pytest.fixture(autouse=True)
def _keep_signal_handlers():
    with kept_signal_handlers():
        yield


def _train(cfg, on_step=None):
    from argen.launcher import preemption
    from argen.launcher.train_gpt import train
    preemption.reset()
    return train(cfg, on_step=on_step)


@pytest.mark.timeout(300)
def test_exact_resume_logs_and_exports(tmp_path):
    import argen.model
    full = _train(tiny_cfg(tmp_path / "full", train={"checkpoint_every": 2, "keep_checkpoints": 2},
                                 log={"wandb": "offline"}))
    stopped = _train(tiny_cfg(tmp_path / "run"), on_step=stop_at(4))
    assert stopped["stopped"] and stopped["losses"] == full["losses"][:4]
    resumed = _train(tiny_cfg(tmp_path / "run"))
    assert resumed["losses"] == full["losses"][4:], "losses after resume differ from the uninterrupted run"
    # logs: one record per step, no duplicates after the resume, the documented fields
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 7))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "data_wait_pct", "peak_mem_gb", "step_time_s"):
        assert key in recs[-1]
    assert recs[-1]["tokens_per_s"] > 0 and recs[-1]["grad_norm"] > 0
    assert [r["loss"] for r in recs] == pytest.approx(full["losses"], rel=1e-6)
    assert (tmp_path / "run" / "config.yaml").is_file()
    # checkpoints in the documented layout; exports load strictly and equal the live run
    ck = tmp_path / "full" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step-00000006"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step-00000004", "step-00000006"]  # keep 2
    m1 = argen.model.load(tmp_path / "full" / "exports" / "step-00000006")
    m2 = argen.model.load(tmp_path / "run" / "exports" / "step-00000006")
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    # wandb offline wrote real run files
    assert list((tmp_path / "full" / "wandb").glob("offline-run-*"))


def _write_shards(prefix, model_type, n=64, grid=4, vocab=512, t5_dim=32):
    import argen.data_pipeline.shard_format as sf
    rng = np.random.default_rng(0)
    shards, idx = [], 0
    for i in range(2):
        with sf.ShardWriter(prefix, i, compression="none") as w:
            for _ in range(n // 2):
                topic = idx % 5
                base = (topic * 37 + np.arange(grid * grid) * (1 + topic % 3)) % vocab
                codes = np.stack([base, base[::-1]]).astype(np.uint16)  # 2 augmentations
                if model_type == "c2i":
                    w.write(sf.encode_sample(idx, codes, label=topic))
                else:
                    L = 3 + topic
                    t5 = torch.from_numpy(rng.standard_normal((L, t5_dim)).astype(np.float32) * 0.1 + topic)
                    w.write(sf.encode_sample(idx, codes, caption=f"topic {topic}", t5=t5, t5_dtype="bfloat16"))
                idx += 1
            shards.append(w.commit())
    m = sf.Manifest(tokenizer={"id": "test"}, codebook_size=vocab, image_size=grid * 16, grid=grid,
                    augmentations=["a", "a-flip"], conditioning="class" if model_type == "c2i" else "caption",
                    num_classes=10 if model_type == "c2i" else None,
                    t5=None if model_type == "c2i" else {"model": "test", "dim": t5_dim, "dtype": "bfloat16",
                                                         "max_length": 120},
                    compression="none", shards=shards)
    sf.write_manifest(prefix, m)


def _assert_learns(losses):
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_tiny_model_learns_from_shards_on_disk(tmp_path, model_type):
    _write_shards(str(tmp_path / "shards"), model_type)
    cfg = tiny_cfg(tmp_path / "run", model_type, data={"source": "shards", "url": str(tmp_path / "shards"),
                                                         "options": {"num_workers": 0}},
                   train={"max_steps": 30}, optim={"lr": 1e-2, "eps": 1e-8})
    res = _train(cfg)
    _assert_learns(res["losses"])
    assert (tmp_path / "run" / "exports" / "step-00000030" / "model.safetensors").is_file()


@pytest.mark.s3
@pytest.mark.timeout(300)
def test_tiny_model_learns_from_s3(tmp_path, s3_bucket):
    _write_shards(f"{s3_bucket}/codes", "c2i")
    cfg = tiny_cfg(tmp_path / "run", data={"url": f"{s3_bucket}/codes", "options": {"num_workers": 0}},
                   train={"max_steps": 30, "checkpoint_every": 15}, optim={"lr": 1e-2, "eps": 1e-8})
    res = _train(cfg, on_step=stop_at(15))
    res2 = _train(cfg)  # resume mid-stream: the loader continues from its saved position
    _assert_learns(res["losses"] + res2["losses"])
    full = _train(tiny_cfg(tmp_path / "full", data={"url": f"{s3_bucket}/codes", "options": {"num_workers": 0}},
                           train={"max_steps": 30}, optim={"lr": 1e-2, "eps": 1e-8}))
    assert res["losses"] + res2["losses"] == full["losses"]


@pytest.mark.timeout(300)
def test_finetune_at_new_resolution_ema_bf16(tmp_path):
    from argen.launcher.train_gpt import load_init_weights
    from argen.model.gpt import GPT
    _train(tiny_cfg(tmp_path / "s1", train={"max_steps": 2}))
    export = tmp_path / "s1" / "exports" / "step-00000002"
    # stage 2: 64 px -> 128 px (4x4 -> 8x8 tokens); RoPE has no weights, so every tensor loads unchanged
    cfg2 = tiny_cfg(tmp_path / "s2", model={"image_size": 128, "init_from": str(export)},
                    train={"max_steps": 3, "precision": "bf16"}, optim={"ema": True, "ema_decay": 0.5})
    m = GPT(cfg2.model.gpt_config())
    load_init_weights(m, str(export))
    from safetensors.torch import load_file
    ref = load_file(str(export / "model.safetensors"))
    assert all(torch.equal(m.state_dict()[k], v) for k, v in ref.items())
    res = _train(cfg2)
    assert len(res["losses"]) == 3 and all(math.isfinite(x) for x in res["losses"])
    assert res["losses"][0] < math.log(512)  # started from trained weights, not from the zero head
    e = tmp_path / "s2" / "exports"
    a, b = load_file(str(e / "step-00000003" / "model.safetensors")), load_file(str(e / "step-00000003-ema" / "model.safetensors"))
    assert set(a) == set(b) and not torch.equal(a["output.weight"], b["output.weight"])
    # the EMA survives a preemption: stop at 2, resume, same EMA export as the uninterrupted run
    cfg3 = tiny_cfg(tmp_path / "s3", model={"image_size": 128, "init_from": str(export)},
                    train={"max_steps": 3, "precision": "bf16"}, optim={"ema": True, "ema_decay": 0.5})
    _train(cfg3, on_step=stop_at(2))
    assert _train(cfg3)["losses"] == res["losses"][2:]
    c = load_file(str(tmp_path / "s3" / "exports" / "step-00000003-ema" / "model.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)


@pytest.mark.parametrize("overrides, match", [
    (["parallel.tp=3"], "parallel.tp"),
    (["parallel.pp=3"], "parallel.pp"),
    (["parallel.pp=2", "parallel.zero=2"], "zero"),
    (["train.lrr=1"], "train.lrr"),
    (["optim.schedule=linearish"], "optim.schedule"),
    (["model.name=GPT-Q"], "model"),
    (["optim.ema=true", "parallel.zero=3"], "optim.ema"),
])
def test_bad_configs_name_the_key(overrides, match):
    from argen.config import ConfigError, load_config
    from argen.launcher.train_config import TrainConfig
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, "configs/gpt-tiny.yaml", overrides)


def test_bad_layouts_at_start(tmp_path):
    from argen.errors import ArgenError
    from argen.launcher import dist_env
    from argen.launcher.train_gpt import batch_split
    from argen.parallel import resolve_layout
    with pytest.raises(ArgenError, match="parallel.dp"):
        resolve_layout(1, 1, 2, 0, 1)  # config asks for dp=2 in a single process
    with pytest.raises(ArgenError, match="train.micro_batch"):
        batch_split(8, 3, 1)
    with pytest.raises(ArgenError, match="train.global_batch"):
        batch_split(9, 0, 2)
    # launch detection -> layout: srun with 4 tasks, tp=2 -> dp=2
    env = dist_env.detect({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "MASTER_ADDR": "n1"})
    assert (env.launcher, env.rank, env.world_size) == ("srun", 3, 4)
    lay = resolve_layout(2, 1, 0, 1, env.world_size)
    assert lay.dp == 2 and lay.coords(env.rank) == {"tp": 1, "dp": 1, "pp": 0}
    env = dist_env.detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert env.launcher == "torchrun" and env.world_size == 2


def test_cli_print_config_and_vq_dispatch(capsys, monkeypatch, tmp_path):
    from argen.cli import main
    assert main(["train", "configs/gpt-tiny.yaml", "parallel.tp=2", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "tp: 2" in out and "name: GPT-tiny" in out
    assert main(["train", "configs/gpt-tiny.yaml", "parallel.tp=3"]) == 2
    assert "parallel.tp" in capsys.readouterr().err
    import sys
    import types
    called = {}
    fake = types.ModuleType("argen.launcher.train_vq")
    fake.run = lambda path, overrides: called.setdefault("args", (path, overrides)) and 0
    monkeypatch.setitem(sys.modules, "argen.launcher.train_vq", fake)
    import argen.launcher
    monkeypatch.setattr(argen.launcher, "train_vq", fake, raising=False)
    vq = tmp_path / "vq.yaml"
    vq.write_text("kind: vq\n")
    assert main(["train", str(vq), "train.max_steps=1"]) == 0
    assert called["args"] == (str(vq), ["train.max_steps=1"])


def test_recipes_load_with_reference_hyperparameters():
    from argen.config import load_config
    from argen.launcher.train_config import TrainConfig
    for name, model in [("gpt-b", "GPT-B"), ("gpt-l", "GPT-L"), ("gpt-xl", "GPT-XL"), ("gpt-3b", "GPT-3B"),
                        ("t2i-xl-stage1", "GPT-XL"), ("t2i-xl-stage2", "GPT-XL")]:
        cfg = load_config(TrainConfig, f"configs/{name}.yaml")
        assert cfg.model.name == model
        assert (cfg.optim.lr, tuple(cfg.optim.betas), cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-4, (0.9, 0.95), 0.05, 1.0)
        assert cfg.optim.schedule == "constant" and cfg.train.global_batch == 256 and cfg.train.precision == "bf16"
    assert load_config(TrainConfig, "configs/t2i-xl-stage2.yaml").model.gpt_config().block_size == 1024


def test_decay_groups_schedule_and_flops():
    from argen.launcher.metrics_log import flops_per_token
    from argen.model.gpt import GPT, gpt_config
    from argen.parallel.parallelize import lr_lambda, param_groups
    m = GPT(gpt_config("GPT-tiny"))
    decay, no_decay = param_groups(list(m.named_parameters()), 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert any("tok_embeddings" in names[id(p)] for p in decay["params"])  # the reference decays embeddings too
    f = lr_lambda("cosine", 10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(110) == pytest.approx(0.1)
    assert lr_lambda("constant", 0, 100, 0.1)(50) == 1.0
    # 6 x (matmul weights) + causal attention; GPT-B c2i at 256 px: 110.9M params, 12.6M + 0.77M are lookups
    g = gpt_config("GPT-B")
    n_matmul = 110_888_448 - 16384 * 768 - 1001 * 768 - (2 * 12 + 1) * 768
    assert flops_per_token(g) == 6 * n_matmul + 12 * 12 * 768 * 256 / 2


def test_data_must_fit_the_model(tmp_path):
    from argen.errors import ArgenError
    from argen.launcher.train_gpt import check_manifest
    _write_shards(str(tmp_path / "shards"), "c2i")
    ok = tiny_cfg(tmp_path / "r", data={"url": str(tmp_path / "shards")})
    check_manifest(ok, ok.model.gpt_config())
    for over, key in [({"vocab_size": 256}, "model.vocab_size"), ({"image_size": 128}, "model.image_size")]:
        bad = tiny_cfg(tmp_path / "r", data={"url": str(tmp_path / "shards")}, model=over)
        with pytest.raises(ArgenError, match=key):
            check_manifest(bad, bad.model.gpt_config())


@pytest.mark.timeout(120)
def test_activation_checkpointing_keeps_the_numbers(tmp_path):
    from safetensors.torch import load_file
    runs = {}
    for mode in ("off", "every_block", "every_n"):
        res = _train(tiny_cfg(tmp_path / mode, parallel={"activation_checkpointing": mode, "checkpoint_every_n": 2},
                              train={"max_steps": 3}))
        runs[mode] = (res["losses"], load_file(str(tmp_path / mode / "exports" / "step-00000003" / "model.safetensors")))
    for mode in ("every_block", "every_n"):
        assert runs[mode][0] == runs["off"][0]
        assert all(torch.equal(runs[mode][1][k], v) for k, v in runs["off"][1].items())
    from argen.model.gpt import GPT, gpt_config
    from argen.parallel.parallelize import apply_activation_checkpointing
    assert apply_activation_checkpointing(GPT(gpt_config("GPT-small")), "every_n", 2) == 3  # blocks 0, 2, 4 of 6


def test_metrics_log_resumes_over_a_truncated_last_line(tmp_path):
    from argen.launcher.metrics_log import MetricsLogger
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.9}\n{"step": 30, "lo')  # killed mid-write
    log = MetricsLogger(tmp_path, True, {}, wandb_setting="off", resume_step=20)
    log.log({"step": 30, "loss": 0.8})
    log.close()
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [10, 20, 30]
