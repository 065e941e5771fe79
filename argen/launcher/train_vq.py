"""Train the VQ tokenizer (`argen train configs/vq16.yaml`): one process or data-parallel, exact resume.

Per step, as the reference: generator forward/backward/step (reconstruction + LPIPS + quantizer losses + GAN term from
`loss.disc_start`), then the EMA update, then the discriminator step on the same, detached reconstructions. Both
models get grad-norm clipping and their own Adam (AdamW when weight_decay > 0; the reference parses a weight decay but
never applies it). Data-parallel runs use torch DDP over argen.launcher.dist_env (gloo on CPU, NCCL on GPUs).

Run directory layout:
    RUN_DIR/config.yaml                 the resolved recipe
    RUN_DIR/metrics.jsonl               one JSON record per log interval / evaluation
    RUN_DIR/grids/step-XXXXXXXX.png     originals (top) over reconstructions (bottom) of a fixed held-out batch
    RUN_DIR/grids/before-after.png      originals / untrained reconstructions / final reconstructions
    RUN_DIR/checkpoints/step-XXXXXXXX/  training state (state.pt + rng-rank{r}.pt); written whole, then renamed
    RUN_DIR/exports/step-XXXXXXXX/      argen.model.save() of the (EMA, if enabled) model: config.json + safetensors
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from argen import device as dev
from argen.config import load_config, save_config, to_dict
from argen.errors import ArgenError
from argen.launcher import dist_env, preemption
from argen.launcher.vq_data import VQDataConfig, fixed_batch, make_loader
from argen.launcher.vq_metrics import codebook_usage, psnr, ssim
from argen.model.vq import VQConfig, VQModel, vq_config
from argen.model.vq_losses import VQLoss, VQLossConfig


@dataclass
class VQModelSection:
    name: str = "VQ-16"
    codebook_size: Optional[int] = None
    codebook_embed_dim: Optional[int] = None
    commit_loss_beta: Optional[float] = None
    entropy_loss_ratio: Optional[float] = None
    dropout_p: Optional[float] = None
    init_from: str = ""  # an argen VQ export to fine-tune from (weights only; steps start at 0)

    def build_config(self, image_size: int) -> VQConfig:
        over = {k: getattr(self, k) for k in ("codebook_size", "codebook_embed_dim", "commit_loss_beta",
                                             "entropy_loss_ratio", "dropout_p") if getattr(self, k) is not None}
        return vq_config(self.name, image_size=image_size, **over)


@dataclass
class VQTrainSection:
    global_batch_size: int = 128
    max_steps: int = 400_000
    lr: float = 1e-4
    lr_disc: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: Literal["fp32", "bf16"] = "bf16"
    ema: bool = False
    ema_decay: float = 0.9999
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 5000
    grid_every: int = 1000
    eval_images: int = 8
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (latest in run_dir, else fresh) | none | path to a checkpoint directory
    wandb: bool = False
    wandb_project: str = "argen-vq"
    threads: int = 0  # CPU intra-op threads; 0 = torch's default
    # Re-seed codebook entries unused for this many steps with encoder outputs of the current batch (0 = off,
    # as the reference). Not needed at the reference's scale; it rescues short runs from codebook collapse.
    codebook_restart_every: int = 0
    # rFID at the end of training through argen.eval (paired scoring): reconstructions of the images in this .npz
    # (arr_0, N x H x W x 3 uint8, e.g. ImageNet val center-crop 256 for the paper's protocol) against themselves.
    rfid_ref: str = ""
    rfid_images: int = 0        # 0 = every image of rfid_ref
    rfid_inception: str = ""    # Inception weight file; "" = argen.eval's default location

    def validate(self) -> None:
        if self.global_batch_size < 1 or self.max_steps < 1:
            raise ValueError("global_batch_size and max_steps must be >= 1")
        if min(self.log_every, self.ckpt_every, self.grid_every) < 1:
            raise ValueError("log_every, ckpt_every and grid_every must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("ema_decay must be in [0, 1)")


@dataclass
class VQTrainConfig:
    kind: str = "vq"
    run_dir: str = "runs/vq"
    model: VQModelSection = field(default_factory=VQModelSection)
    data: VQDataConfig = field(default_factory=VQDataConfig)
    loss: VQLossConfig = field(default_factory=VQLossConfig)
    train: VQTrainSection = field(default_factory=VQTrainSection)

    def validate(self) -> None:
        if self.kind != "vq":
            raise ValueError(f"kind must be 'vq' for the tokenizer trainer, got '{self.kind}'")
        try:
            self.model.build_config(self.data.image_size)  # unknown names / bad sizes fail at load
        except (ArgenError, ValueError) as e:
            raise ValueError(f"model.name={self.model.name} with data.image_size={self.data.image_size}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def _ckpt_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "state.pt").is_file())


def find_resume(cfg: VQTrainConfig) -> Path | None:
    r = cfg.train.resume
    if r == "none":
        return None
    if r == "auto":
        dirs = _ckpt_dirs(Path(cfg.run_dir))
        return dirs[-1] if dirs else None
    p = Path(r)
    if not (p / "state.pt").is_file():
        raise ArgenError(f"train.resume: no checkpoint at {r} (expected {p / 'state.pt'})")
    return p


def _check_inputs(cfg: VQTrainConfig) -> None:
    if cfg.loss.perceptual_weight > 0:
        from argen.model.lpips import LPIPS
        LPIPS.check_dir(cfg.loss.lpips_dir)
    if cfg.data.source == "folder" and not Path(cfg.data.path).is_dir():
        raise ArgenError(f"data.path: image folder not found: {cfg.data.path}")
    if cfg.data.source == "wds":
        from argen.launcher.vq_data import expand_urls
        expand_urls(cfg.data.path)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Trainer:
    def __init__(self, cfg: VQTrainConfig):
        self.cfg = cfg
        self.env, self.device = dist_env.init()
        self.world, self.rank = self.env.world_size, self.env.rank
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.run_dir = Path(cfg.run_dir)
        self.dtype = torch.bfloat16 if t.precision == "bf16" else None
        _check_inputs(cfg)  # fail on a bad path in seconds, before building models
        dev.manual_seed_all(t.seed)
        self.model = VQModel(cfg.model.build_config(cfg.data.image_size)).to(self.device)
        if cfg.model.init_from:
            from argen.model.io import load
            src = load(cfg.model.init_from)
            if src.kind != "vq" or src.config.codebook_size != self.model.config.codebook_size:
                raise ArgenError(f"model.init_from: {cfg.model.init_from} is not a compatible VQ export")
            self.model.load_state_dict(src.state_dict(), strict=True)
        self.loss = VQLoss(cfg.loss).to(self.device)
        opt_cls = torch.optim.AdamW if t.weight_decay > 0 else torch.optim.Adam
        self.opt = opt_cls(self.model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.opt_d = opt_cls(self.loss.discriminator.parameters(), lr=t.lr_disc, betas=t.betas,
                             weight_decay=t.weight_decay)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if t.ema else None
        self.step = 0
        self._restart_counts: torch.Tensor | None = None
        ckpt = find_resume(cfg)
        if ckpt is not None:
            self._load(ckpt)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if dev.is_accelerator(self.device) else None
            # no buffer broadcast for the VQ: its only buffer is the per-rank usage FIFO
            self.model_dp = DDP(self.model, device_ids=ids, broadcast_buffers=False)
            self.disc_dp = DDP(self.loss.discriminator, device_ids=ids)
        else:
            self.model_dp, self.disc_dp = self.model, self.loss.discriminator
        self.counts = torch.zeros(self.model.codebook_size, dtype=torch.float64, device=self.device)
        if self._restart_counts is None:
            self._restart_counts = torch.zeros_like(self.counts)

    # -- state --------------------------------------------------------------------------------------------------

    def _load(self, path: Path) -> None:
        state = torch.load(path / "state.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.loss.discriminator.load_state_dict(state["discriminator"])
        self.opt.load_state_dict(state["optimizer"])
        self.opt_d.load_state_dict(state["optimizer_disc"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ArgenError(f"{path}: train.ema is on but the checkpoint has no EMA weights")
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        if state.get("restart_counts") is not None:
            self._restart_counts = state["restart_counts"].to(self.device)
        rng = path / f"rng-rank{self.rank}.pt"
        if rng.is_file():
            dev.set_rng_state(torch.load(rng, weights_only=False))
        if self.rank == 0:
            print(f"[train_vq] resumed from {path} at step {self.step}", flush=True)

    def save_checkpoint(self) -> Path:
        root = self.run_dir / "checkpoints"
        final = root / f"step-{self.step:08d}"
        tmp = root / f"step-{self.step:08d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        torch.save(dev.rng_state(), tmp / f"rng-rank{self.rank}.pt")
        if self.rank == 0:
            torch.save({"model": self.model.state_dict(), "discriminator": self.loss.discriminator.state_dict(),
                        "optimizer": self.opt.state_dict(), "optimizer_disc": self.opt_d.state_dict(),
                        "ema": self.ema.state_dict() if self.ema is not None else None, "step": self.step,
                        "restart_counts": self._restart_counts,
                        "config": to_dict(self.cfg)}, tmp / "state.pt")
        _barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # state.pt present in a step-* dir means the checkpoint is whole
            for old in _ckpt_dirs(self.run_dir)[:-max(1, self.cfg.train.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def export(self) -> Path:
        from argen.model.io import save
        model = self.ema if self.ema is not None else self.model
        out = self.run_dir / "exports" / f"step-{self.step:08d}"
        if self.rank == 0:
            save(model, out, {"step": self.step, "ema": self.ema is not None, "source": "argen train (vq)",
                              "image_size": self.cfg.data.image_size})
        _barrier()
        return out

    # -- one step ------------------------------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        t = self.cfg.train
        it = self.step + 1
        self.model_dp.train()
        self.loss.discriminator.train()
        with dev.autocast(self.device, self.dtype):
            xr, q = self.model_dp(x)
            loss_g, logs = self.loss.generator_loss(x, xr, q, it, self.model.decoder.last_layer,
                                                    self.loss.discriminator)
        self.opt.zero_grad(set_to_none=True)
        loss_g.backward()
        logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.max_grad_norm))
        self.opt.step()
        if self.ema is not None:
            with torch.no_grad():
                for pe, p in zip(self.ema.parameters(), self.model.parameters()):
                    pe.lerp_(p, 1.0 - t.ema_decay)
                for be, b in zip(self.ema.buffers(), self.model.buffers()):
                    be.copy_(b)
        if self.loss.gan_active(it) and self.cfg.loss.disc_weight > 0:
            with dev.autocast(self.device, self.dtype):
                loss_d, dlogs = self.loss.discriminator_loss(x, xr.detach(), it, self.disc_dp)
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            dlogs["grad_norm_d"] = float(torch.nn.utils.clip_grad_norm_(self.loss.discriminator.parameters(),
                                                                         t.max_grad_norm))
            self.opt_d.step()
            logs.update(dlogs)
        hist = torch.bincount(q.indices.reshape(-1), minlength=self.counts.numel()).to(self.counts.dtype)
        self.counts += hist
        self._restart_counts += hist
        logs["psnr_train"] = float(psnr(x.detach(), xr.detach().float()).mean())
        if q.usage is not None:
            logs["usage_fifo"] = q.usage
        self.step += 1
        if t.codebook_restart_every and self.step % t.codebook_restart_every == 0:
            logs["codes_restarted"] = float(self._restart_dead_codes(x))
        return logs

    @torch.no_grad()
    def _restart_dead_codes(self, x: torch.Tensor) -> int:
        counts = self._restart_counts
        if dist.is_initialized():
            dist.all_reduce(counts)  # every rank decides on the same dead set
        dead = (counts == 0).nonzero().flatten()
        counts.zero_()
        if dead.numel() == 0:
            return 0
        m = self.model
        was = m.training
        m.eval()
        with dev.autocast(self.device, self.dtype):
            z = m.quant_conv(m.encoder(x))
        m.train(was)
        z = z.permute(0, 2, 3, 1).reshape(-1, m.code_dim).float()
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + self.step)
        pick = torch.randint(0, z.shape[0], (dead.numel(),), generator=g).to(z.device)
        new = z[pick] + 0.01 * z.std() * torch.randn(dead.numel(), z.shape[1], generator=g).to(z.device)
        if m.config.codebook_l2_norm:
            new = torch.nn.functional.normalize(new, dim=-1)
        if dist.is_initialized():
            dist.broadcast(new, 0)  # rank 0's batch supplies the new entries
        w = m.quantize.embedding.weight
        w[dead] = new.to(w.dtype)
        for key, buf in self.opt.state.get(w, {}).items():
            if torch.is_tensor(buf) and buf.shape == w.shape:
                buf[dead] = 0  # fresh moments for the re-seeded rows
        return int(dead.numel())

    # -- evaluation ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        model = self.ema if self.ema is not None else self.model
        was = model.training
        model.eval()
        with dev.autocast(self.device, self.dtype):
            xr, _ = model(x)
        model.train(was)
        return xr.float()


def _grid(rows: list[torch.Tensor], path: Path) -> None:
    from argen.model.pixels import save_grid
    save_grid(torch.cat([r.cpu() for r in rows]), path, cols=rows[0].shape[0])


def _reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not dist.is_initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def compute_rfid(tr: Trainer) -> dict:
    """rFID, PSNR and SSIM of the (EMA) model on `train.rfid_ref` via argen.eval (reconstruct, then paired scoring);
    never a stand-in. Both sides stream through npz files: 50k images at 256 px are ~10 GB."""
    t = tr.cfg.train
    if not t.rfid_ref:
        return {"rfid": "unavailable (set train.rfid_ref to an .npz of reference images)"}
    from argen.eval.npz import NpzImages, npz_writer
    from argen.eval.reconstruct import reconstruct
    from argen.eval.score import score
    ref = NpzImages(t.rfid_ref)
    n = min(len(ref), t.rfid_images) if t.rfid_images else len(ref)
    out_dir = tr.run_dir / "rfid"
    recon_path = out_dir / f"recon-step-{tr.step:08d}.npz"
    model = tr.ema if tr.ema is not None else tr.model
    was = model.training
    model.eval()
    try:
        reconstruct(tr.run_dir, t.rfid_ref, recon_path, device=tr.device, vq=model, limit=n, dtype=tr.dtype)
    finally:
        model.train(was)
    ref_path = t.rfid_ref
    if n < len(ref):  # paired scoring needs the same images in the same order on both sides
        ref_path = str(out_dir / f"reference-first-{n}.npz")
        with npz_writer(ref_path, (n, *ref.shape[1:])) as write:
            for batch in ref.batches(256, n):
                write(batch)
    res = score(recon_path, ref_path, inception=t.rfid_inception or None, device=tr.device, paired=True)
    metrics = res["metrics"]
    return {**{k: float(metrics[k]) for k in ("rfid", "psnr", "ssim") if k in metrics},
            "reference": t.rfid_ref, "images": n}


def train(cfg: VQTrainConfig) -> dict:
    tr = Trainer(cfg)
    t = cfg.train
    main = tr.rank == 0
    run_dir = tr.run_dir
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    preemption.install()
    eval_x = fixed_batch(cfg.data, t.eval_images).to(tr.device)
    initial = tr.reconstruct(eval_x) if (main and tr.step == 0) else None
    if initial is not None:
        _grid([eval_x, initial], run_dir / "grids" / "step-00000000.png")
    wb = None
    if main and t.wandb:
        import wandb
        wb = wandb.init(project=t.wandb_project, dir=str(run_dir), config=to_dict(cfg),
                        mode=os.environ.get("WANDB_MODE", "offline"), name=run_dir.name, resume="allow")
    metrics = open(run_dir / "metrics.jsonl", "a") if main else None

    def record(rec: dict) -> None:
        if main:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            if wb is not None:
                wb.log(rec, step=rec["step"])

    loader = make_loader(cfg.data, t.global_batch_size, tr.rank, tr.world, tr.step, t.seed)
    bar = tqdm(total=t.max_steps, initial=tr.step, desc="train vq", disable=not main, dynamic_ncols=True)
    window: dict[str, float] = {}
    seen: dict[str, int] = {}
    n_window, t0, stopped = 0, time.perf_counter(), False
    last = {}
    while tr.step < t.max_steps:
        x = next(loader).to(tr.device, non_blocking=True)
        logs = tr.train_step(x)
        for k, v in logs.items():
            window[k] = window.get(k, 0.0) + v
            seen[k] = seen.get(k, 0) + 1
        n_window += 1
        bar.update(1)
        if tr.step % t.log_every == 0 or tr.step == t.max_steps:
            # means over the steps that produced each value (loss_d only exists once the GAN is on);
            # codes_restarted is a count, summed
            avg = _reduce_mean({k: v if k == "codes_restarted" else v / seen[k] for k, v in window.items()},
                               tr.device)
            counts = tr.counts.clone()
            if dist.is_initialized():
                dist.all_reduce(counts)
            dt = time.perf_counter() - t0
            avg.update(step=tr.step, usage_window=codebook_usage(counts),
                       images_per_s=n_window * t.global_batch_size / max(dt, 1e-9), lr=t.lr)
            record(avg)
            bar.set_postfix(rec=f"{avg['loss_rec']:.4f}", psnr=f"{avg['psnr_train']:.2f}",
                            usage=f"{avg['usage_window']:.3f}")
            last = avg
            window, seen, n_window, t0 = {}, {}, 0, time.perf_counter()
            tr.counts.zero_()
        if tr.step % t.grid_every == 0 and main:
            xr = tr.reconstruct(eval_x)
            _grid([eval_x, xr], run_dir / "grids" / f"step-{tr.step:08d}.png")
            record({"step": tr.step, "eval_psnr": float(psnr(eval_x, xr).mean()),
                    "eval_ssim": float(ssim(eval_x, xr).mean())})
        if tr.step % t.ckpt_every == 0 and tr.step < t.max_steps:
            tr.save_checkpoint()
        if preemption.stop_requested():
            stopped = True
            break
    bar.close()
    ckpt = tr.save_checkpoint()
    result = {"step": tr.step, "checkpoint": str(ckpt), "stopped_early": stopped, **last}
    if stopped:
        if main:
            print(f"[train_vq] stop requested ({preemption.reason()}): checkpoint {ckpt}; rerun to resume", flush=True)
    else:
        export = tr.export()
        result["export"] = str(export)
        if main:
            xr = tr.reconstruct(eval_x)
            final = {"step": tr.step, "eval_psnr": float(psnr(eval_x, xr).mean()),
                     "eval_ssim": float(ssim(eval_x, xr).mean()), "final": True}
            final.update({k if k == "rfid" else f"rfid_{k}": v for k, v in compute_rfid(tr).items()})
            record(final)
            result.update(final)
            _grid([eval_x, xr], run_dir / "grids" / f"step-{tr.step:08d}.png")
            if initial is not None:
                _grid([eval_x, initial, xr], run_dir / "grids" / "before-after.png")
            rfid = final["rfid"] if isinstance(final["rfid"], str) else f"{final['rfid']:.3f}"
            print(f"[train_vq] done: step {tr.step}, eval PSNR {final['eval_psnr']:.2f} dB, "
                  f"SSIM {final['eval_ssim']:.3f}, rFID {rfid}; export {export}", flush=True)
    if metrics is not None:
        metrics.close()
    if wb is not None:
        wb.finish()
    return result


def run(config_path: str, overrides: list[str]) -> int:
    """Entry point for `argen train` when the recipe says `kind: vq`."""
    cfg = load_config(VQTrainConfig, config_path, list(overrides or []))
    result = train(cfg)
    return 0 if result else 1
