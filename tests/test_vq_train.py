"""Tokenizer training: learning on a fixed batch, the run() loop end to end, exact resume, data-parallel parity."""
import json
import math

import pytest
import torch

import argen.model
from argen.config import load_config
from argen.launcher import preemption
from argen.launcher.train_vq import VQTrainConfig, run, train
from argen.launcher.vq_data import VQDataConfig, fixed_batch
from argen.model.vq import VQ_SIZES, VQModel
from argen.model.vq_losses import VQLoss, VQLossConfig
from tests.dist_utils import run_distributed


def _cfg(run_dir, disc_start=2, **train_over):
    data = {"run_dir": str(run_dir), "model": {"name": "VQ-micro"},
            "data": {"source": "synthetic", "image_size": 16, "synthetic_count": 32, "num_workers": 0},
            "loss": {"perceptual_weight": 0.0, "disc_start": disc_start, "disc_ndf": 8, "disc_layers": 2},
            "train": {"global_batch_size": 4, "max_steps": 4, "lr": 1e-3, "precision": "fp32", "log_every": 2,
                      "ckpt_every": 2, "grid_every": 2, "eval_images": 2, "ema": True, "ema_decay": 0.9}}
    data["train"].update(train_over)
    return load_config(VQTrainConfig, None, data=data)


def test_a_few_steps_lower_the_reconstruction_loss():
    torch.manual_seed(0)
    model = VQModel(VQ_SIZES["VQ-micro"]).train()
    loss = VQLoss(VQLossConfig(perceptual_weight=0.0, disc_ndf=8, disc_layers=2))
    x = fixed_batch(VQDataConfig(image_size=16), 4)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    recs = []
    for it in range(1, 41):
        xr, q = model(x)
        total, logs = loss.generator_loss(x, xr, q, it)
        opt.zero_grad()
        total.backward()
        opt.step()
        recs.append(logs["loss_rec"])
    assert recs[-1] < 0.6 * recs[0], recs[::8]


def _state(path):
    return torch.load(path / "state.pt", weights_only=False)


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.timeout(240)
def test_run_end_to_end_and_exact_resume_after_preemption(tmp_path):
    cfg_a = _cfg(tmp_path / "a", codebook_restart_every=3)
    result = train(cfg_a)
    assert result["step"] == 4 and not result["stopped_early"]
    # logs, grids, export
    recs = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss_rec" in r]
    assert [r["step"] for r in steps] == [2, 4]
    assert {"usage_window", "psnr_train", "loss_d", "loss_g_adv", "images_per_s"} <= set(steps[-1])
    assert steps[-1]["codes_restarted"] > 0  # dead-code re-seeding ran at step 3
    assert steps[-1]["gan_weight"] == 0.5  # disc_start 2: the GAN is on at iterations 2..4
    final = recs[-1]
    assert final["final"] and final["eval_psnr"] > 0 and -1 <= final["eval_ssim"] <= 1 and isinstance(final["rfid"], str)
    for name in ("step-00000000.png", "step-00000004.png", "before-after.png"):
        assert (tmp_path / "a" / "grids" / name).is_file()
    export = tmp_path / "a" / "exports" / "step-00000004"
    vq = argen.model.load(export)
    assert vq.kind == "vq" and json.loads((export / "config.json").read_text())["meta"]["ema"] is True
    state_a = _state(tmp_path / "a" / "checkpoints" / "step-00000004")
    for k, v in state_a["ema"].items():  # the export is the EMA model
        torch.testing.assert_close(vq.state_dict()[k], v)

    # same recipe, stopped by a preemption signal after the first step, then resumed with resume=auto
    cfg_b = _cfg(tmp_path / "b", codebook_restart_every=3)
    preemption.reset()
    preemption.request("test")
    try:
        stopped = train(cfg_b)
    finally:
        preemption.reset()
    assert stopped["stopped_early"] and stopped["step"] == 1
    assert not (tmp_path / "b" / "exports").exists()
    assert run(str(_write_yaml(cfg_b, tmp_path / "b.yaml")), []) == 0
    state_b = _state(tmp_path / "b" / "checkpoints" / "step-00000004")
    for key in ("model", "discriminator", "optimizer", "optimizer_disc", "ema", "step"):
        _assert_same(state_a[key], state_b[key], key)
    kept = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert kept == ["step-00000002", "step-00000004"]  # keep_checkpoints = 2, no leftover .tmp


def _write_yaml(cfg, path):
    from argen.config import save_config
    save_config(cfg, path)
    return path


def test_bad_recipe_names_the_key(tmp_path):
    from argen.errors import ArgenError
    with pytest.raises(ArgenError, match="train.max_stepz"):
        load_config(VQTrainConfig, None, ["train.max_stepz=3"])
    with pytest.raises(ArgenError, match="unknown VQ model"):
        load_config(VQTrainConfig, None, ["model.name=VQ-99"])
    with pytest.raises(ArgenError, match="data.path"):
        load_config(VQTrainConfig, None, ["data.source=folder"])


def _ddp_worker(rank, run_dir):
    # run_distributed sets the torchrun-style variables and the thread cap, and tears the process group down
    train(_cfg(run_dir, disc_start=100, max_steps=3, ema=False, ckpt_every=100, grid_every=100))


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_data_parallel_matches_single_process(tmp_path):
    run_distributed(_ddp_worker, 2, str(tmp_path / "ddp"), timeout=200)  # kills its ranks before pytest's timeout
    train(_cfg(tmp_path / "single", disc_start=100, max_steps=3, ema=False, ckpt_every=100, grid_every=100))
    a = _state(tmp_path / "ddp" / "checkpoints" / "step-00000003")
    b = _state(tmp_path / "single" / "checkpoints" / "step-00000003")
    for k, v in b["model"].items():
        if k.endswith("codebook_used"):
            continue  # the usage FIFO is per rank by design
        torch.testing.assert_close(a["model"][k], v, atol=2e-5, rtol=1e-4, msg=k)
    # (the GAN is off here: the PatchGAN's BatchNorm sees per-rank batches, as in the reference, so D differs)


def test_bf16_autocast_step_runs(tmp_path):
    result = train(_cfg(tmp_path / "bf16", precision="bf16", max_steps=2, ema=False, grid_every=100, ckpt_every=100))
    assert result["step"] == 2 and math.isfinite(result["loss_rec"])  # neither NaN nor inf
    vq = argen.model.load(result["export"])
    assert next(vq.parameters()).dtype == torch.float32  # master weights stay fp32


@pytest.mark.timeout(240)
def test_rfid_through_argen_eval(tmp_path):
    import numpy as np
    from argen.eval.inception import InceptionV3, save_inception
    from argen.eval.npz import save_images
    torch.manual_seed(0)
    weights = save_inception(InceptionV3(width=1 / 8, input_size=75), tmp_path / "inception.safetensors")
    ref = (fixed_batch(VQDataConfig(image_size=16), 6) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    save_images(tmp_path / "ref.npz", ref.permute(0, 2, 3, 1).numpy())
    cfg = _cfg(tmp_path / "r", max_steps=1, ema=False, grid_every=100, ckpt_every=100, rfid_ref=str(tmp_path / "ref.npz"),
               rfid_images=5, rfid_inception=str(weights))
    result = train(cfg)
    assert isinstance(result["rfid"], float) and np.isfinite(result["rfid"]) and result["rfid_images"] == 5
    assert 0 < result["rfid_psnr"] < 100
    from argen.eval.npz import NpzImages
    assert len(NpzImages(tmp_path / "r" / "rfid" / "recon-step-00000001.npz")) == 5
    first = NpzImages(tmp_path / "r" / "rfid" / "reference-first-5.npz").read_all()
    assert np.array_equal(first, ref.permute(0, 2, 3, 1).numpy()[:5])  # paired: the same images, in order
    # without a reference set the status says so instead of a number
    plain = train(_cfg(tmp_path / "p", max_steps=1, ema=False, grid_every=100, ckpt_every=100))
    assert plain["rfid"].startswith("unavailable")
