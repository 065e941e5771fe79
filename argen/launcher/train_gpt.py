"""The GPT training loop: `argen train configs/gpt-*.yaml [key=value ...]`, one process to many nodes.

It reads top to bottom:  launch -> layout -> model (fresh, resumed or fine-tuned) -> parallelize -> data ->
restore -> loop { next micro-batches; train_step; log; checkpoint/export; preemption } -> final checkpoint.
Everything distributed lives in argen.parallel; checkpoints in argen.launcher.checkpoint; logging in metrics_log.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from argen import device as dev
from argen.config import save_config, to_dict
from argen.errors import ArgenError
from argen.launcher import checkpoint as ckpt_io
from argen.launcher import dist_env, preemption
from argen.launcher.metrics_log import MetricsLogger, flops_per_token
from argen.launcher.train_config import TrainConfig
from argen.model.gpt import GPT, GPTConfig
from argen.parallel import parallelize, resolve_layout


# ---------------------------------------------------------------------------------------------------------------
# data

class SyntheticCodes:
    """Deterministic in-memory code data with learnable structure (c2i: codes follow the label; t2i: codes follow a
    caption 'topic', captions have varied lengths and some samples are invalid). Sample i of the global stream is
    the same for every layout: data-parallel rank r of d takes micro-batch k as samples
    [(k*d + r)*m, (k*d + r + 1)*m), so any dp/accumulation split of a global batch sees the same samples."""

    def __init__(self, gcfg: GPTConfig, num_samples: int, seed: int, dp_rank: int, dp: int, micro: int):
        self.g, self.n, self.seed = gcfg, num_samples, seed
        self.dp_rank, self.dp, self.micro = dp_rank, dp, micro
        self.k = 0  # micro-batches produced by this rank

    def _sample(self, i: int) -> dict:
        g = self.g
        j = i % self.n
        rng = np.random.default_rng([self.seed, j])
        topic = j % min(g.num_classes if g.model_type == "c2i" else 16, 10)
        k = np.arange(g.block_size)
        codes = (topic * 131 + k * (1 + topic % 3)) % g.vocab_size
        noise = rng.random(g.block_size) < 0.1
        codes = np.where(noise, rng.integers(0, g.vocab_size, g.block_size), codes)
        out = {"codes": torch.from_numpy(codes.astype(np.int64))}
        if g.model_type == "c2i":
            out["cond"] = torch.tensor(topic, dtype=torch.long)
        else:
            base = np.random.default_rng([self.seed, 10 ** 6 + topic]).standard_normal((g.cls_token_num, g.caption_dim))
            feats = base + 0.1 * rng.standard_normal(base.shape)
            length = 4 + topic % max(g.cls_token_num - 4, 1)
            mask = np.zeros(g.cls_token_num, dtype=bool)
            mask[g.cls_token_num - length:] = True  # right-aligned like the reference
            feats[~mask] = 0.0
            out["cond"] = torch.from_numpy(feats.astype(np.float32) / math.sqrt(g.caption_dim))
            out["cond_mask"] = torch.from_numpy(mask)
            out["valid"] = torch.tensor(0.0 if j % 13 == 5 else 1.0)
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = (self.k * self.dp + self.dp_rank) * self.micro
        items = [self._sample(start + i) for i in range(self.micro)]
        self.k += 1
        return {key: torch.stack([it[key] for it in items]) for key in items[0]}

    def state_dict(self) -> dict:
        return {"samples": self.k * self.micro * self.dp}

    def global_state_dict(self) -> dict:
        return self.state_dict()

    def close(self) -> None:
        pass

    def load_state_dict(self, state: dict) -> None:
        per = self.micro * self.dp
        if state["samples"] % per:
            raise ArgenError(f"data position {state['samples']} is not a multiple of micro_batch x dp = {per}")
        self.k = state["samples"] // per


class ShardBatches:
    """Adapter over argen.data_pipeline.loader: renames its batch keys (argen.data_pipeline.collate: codes, labels or
    caption_embs + caption_mask, valid) to the loop's (codes, cond, cond_mask, valid)."""

    def __init__(self, inner):
        self.inner = inner
        self.it = iter(inner)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = next(self.it)
        out = {"codes": b["codes"].long()}
        if "labels" in b:
            out["cond"] = torch.as_tensor(b["labels"]).long()
        else:
            out["cond"], out["cond_mask"] = b["caption_embs"].float(), b["caption_mask"].bool()
        if "valid" in b:
            out["valid"] = torch.as_tensor(b["valid"]).float()
        return out

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def global_state_dict(self) -> dict:
        """Every data-parallel rank's position (a collective when dp > 1)."""
        return self.inner.global_state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
        self.it = iter(self.inner)

    def close(self) -> None:
        self.inner.close()


def check_manifest(cfg: TrainConfig, gcfg: GPTConfig) -> None:
    """The data set must fit the model: codebook within the vocabulary, the token grid of the resolution, the task."""
    if not cfg.data.url:
        return
    from argen.data_pipeline import shard_format
    m = shard_format.read_manifest(cfg.data.url.rstrip("/").removesuffix("/manifest.json"))
    if m.codebook_size > gcfg.vocab_size:
        raise ArgenError(f"model.vocab_size {gcfg.vocab_size} is smaller than the data's codebook "
                         f"({m.codebook_size}, {cfg.data.url}); set model.vocab_size={m.codebook_size}")
    if m.grid != gcfg.grid:
        raise ArgenError(f"model.image_size {cfg.model.image_size} gives a {gcfg.grid}x{gcfg.grid} token grid but "
                         f"{cfg.data.url} holds {m.grid}x{m.grid} codes (image_size {m.image_size})")
    want = "class" if gcfg.model_type == "c2i" else "caption"
    if m.conditioning != want:
        raise ArgenError(f"model.model_type {gcfg.model_type} needs {want}-conditioned data; {cfg.data.url} is "
                         f"{m.conditioning}-conditioned")
    if gcfg.model_type == "t2i" and m.t5 and int(m.t5.get("dim", gcfg.caption_dim)) != gcfg.caption_dim:
        raise ArgenError(f"model.caption_dim {gcfg.caption_dim} != the data's T5 dim {m.t5['dim']}")


def make_loader(cfg: TrainConfig, gcfg: GPTConfig, dp_rank: int, dp: int, micro: int):
    if cfg.data.resolved_source() == "synthetic":
        return SyntheticCodes(gcfg, cfg.data.synthetic_samples, cfg.train.seed, dp_rank, dp, micro)
    try:
        from argen.data_pipeline.loader import DataConfig, build_loader
    except ImportError as e:
        raise ArgenError(f"data.url: reading shards needs argen.data_pipeline.loader ({e})") from None
    check_manifest(cfg, gcfg)
    from argen.config import load_config
    dcfg = load_config(DataConfig, data={"url": cfg.data.url, "task": gcfg.model_type, "seed": cfg.train.seed,
                                         "caption_slots": gcfg.cls_token_num, **cfg.data.options})
    return ShardBatches(build_loader(dcfg, dp_rank, dp, micro))


# ---------------------------------------------------------------------------------------------------------------
# helpers

def batch_split(global_batch: int, micro: int, dp: int) -> tuple[int, int]:
    """(micro-batch per rank, accumulation steps) for a global batch."""
    if global_batch % dp:
        raise ArgenError(f"train.global_batch {global_batch} is not divisible by data-parallel size {dp}")
    per_rank = global_batch // dp
    micro = micro or per_rank
    if per_rank % micro:
        raise ArgenError(f"train.micro_batch {micro} does not divide the per-rank batch {per_rank} "
                         f"(global_batch {global_batch} / dp {dp})")
    return micro, per_rank // micro


def set_scheduler_step(sched, step: int) -> None:
    """Put a LambdaLR at `step` completed optimizer steps (the lr the next step uses)."""
    sched.last_epoch = step
    lrs = [base * lmbda(step) for base, lmbda in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs


def load_init_weights(model: GPT, path: str) -> None:
    """Fine-tuning start: weights from an export dir or a checkpoint (strict names and shapes)."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        params = load_file(str(p / "model.safetensors"))
    else:
        c = ckpt_io.resolve_resume(str(p), p)
        params, _ = ckpt_io.read_universal(c)
    ckpt_io.load_weights_into(model, params, f"model.init_from {path}")


class EMA:
    """Exponential moving average of this rank's (fp32 copies of) local parameters."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in named}

    @torch.no_grad()
    def update(self, named) -> None:
        for n, p in named:
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)


def _seed_rank(seed: int, dp_rank: int, step: int) -> None:
    # TP ranks of one data-parallel replica share the stream (identical dropout on replicated activations)
    dev.manual_seed_all(seed * 1_000_003 + dp_rank * 7919 + step)


# ---------------------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run the loop; returns {'losses': [...], 'step': final step, 'run_dir': ...} (losses of this process)."""
    # launch and layout
    env, device = dist_env.init()
    preemption.install()
    layout = resolve_layout(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp, cfg.parallel.zero, env.world_size)
    coords = layout.coords(env.rank)
    micro, accum = batch_split(cfg.train.global_batch, cfg.train.micro_batch, layout.dp)
    gcfg = cfg.model.gpt_config()
    run_dir = Path(cfg.run_dir)
    is_main = env.rank == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    use_ds = not layout.is_single or cfg.parallel.single_process_engine == "deepspeed"
    layout_info = {**layout.to_dict(), "precision": cfg.train.precision, "engine": "deepspeed" if use_ds else "torch",
                   "world_size": layout.world_size, "global_batch": cfg.train.global_batch}

    # model: fresh, or resumed (weights from the universal copy when the layout changed), or fine-tuned
    resume = ckpt_io.resolve_resume(cfg.train.resume, run_dir)
    torch.manual_seed(cfg.train.seed)
    model = GPT(gcfg)
    n_params = sum(p.numel() for p in model.parameters())
    native, trainer_state, params, optim = False, {}, None, None
    if resume is not None:
        saved = ckpt_io.read_json(resume, "layout.json")
        trainer_state = ckpt_io.read_json(resume, "trainer.json")
        native = use_ds and saved == layout_info and (resume.parent == run_dir / "checkpoints")
        if not native:
            params, optim = ckpt_io.read_universal(resume)
            ckpt_io.load_weights_into(model, params, str(resume))
    elif cfg.model.init_from:
        load_init_weights(model, cfg.model.init_from)

    par = parallelize(model, layout, ocfg=cfg.optim, micro_batch=micro, accum=accum,
                      precision=cfg.train.precision, max_steps=cfg.train.max_steps,
                      activation_checkpointing=cfg.parallel.activation_checkpointing,
                      checkpoint_every_n=cfg.parallel.checkpoint_every_n, compile=cfg.train.compile,
                      force_deepspeed=use_ds and layout.is_single, device=device)
    loader = make_loader(cfg, gcfg, coords["dp"], layout.dp, micro)

    # restore
    step, ema_note = 0, ""
    ema = EMA(par.local_named_params(), cfg.optim.ema_decay) if cfg.optim.ema else None
    if resume is not None:
        step = int(trainer_state["step"])
        rank_file = resume / "argen" / f"rank-{env.rank:05d}.pt"
        if native:
            par.engine.load_checkpoint(str(resume.parent), tag=resume.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
        else:
            ckpt_io.restore_optimizer(par, params, optim, step)
        set_scheduler_step(par.scheduler, step)
        same_layout = saved == layout_info
        if same_layout and rank_file.is_file():
            rs = torch.load(rank_file, weights_only=False)
            dev.set_rng_state(rs["rng"])
            loader.load_state_dict(rs["data"])
            if ema is not None and ckpt_io.ema_path(resume, par).is_file():
                ema.shadow = load_file(str(ckpt_io.ema_path(resume, par)), device=str(device))
            elif ema is not None:
                ema_note = "; the checkpoint holds no EMA weights, so the EMA restarts from the resumed weights"
        else:  # another layout: data position from the global state, fresh RNG streams, EMA from the weights
            loader.load_state_dict(trainer_state["data"])
            _seed_rank(cfg.train.seed, coords["dp"], step)
        del params, optim
    else:
        _seed_rank(cfg.train.seed, coords["dp"], 0)

    logger = MetricsLogger(run_dir, is_main, to_dict(cfg), cfg.log.wandb, cfg.log.project, cfg.log.name,
                           resume_step=step)
    logger.info(f"{gcfg.name} {gcfg.model_type} ({n_params / 1e6:.1f}M params) "
                f"layout tp={layout.tp} pp={layout.pp} dp={layout.dp} zero={layout.zero} "
                f"engine={'deepspeed' if use_ds else 'torch'} micro={micro} accum={accum} "
                f"precision={cfg.train.precision} device={device.type} git={logger.revision[:12]}"
                + (f"; resumed from {resume} at step {step}{ema_note}" if resume else ""))
    flops_tok = flops_per_token(gcfg)
    peak = dev.peak_flops(device)
    tokens_per_step = cfg.train.global_batch * gcfg.block_size
    par.train(True)
    losses: list[float] = []
    dev.reset_peak_memory(device)
    t_log, wait_log, steps_log = time.perf_counter(), 0.0, 0
    stopped = False
    # the loop
    while step < cfg.train.max_steps:
        t0 = time.perf_counter()
        micro_batches = [{k: v.to(device, non_blocking=True) for k, v in next(loader).items()} for _ in range(accum)]
        wait_log += time.perf_counter() - t0
        lr = par.lr()  # the lr this step uses
        out = par.train_step(micro_batches)
        step += 1
        steps_log += 1
        losses.append(out["loss"])
        if ema is not None:
            ema.update(par.local_named_params())
        if on_step is not None:
            on_step(step, out)
        if step % cfg.log.every == 0 or step == cfg.train.max_steps:
            dev.synchronize(device)
            el = time.perf_counter() - t_log
            tps = tokens_per_step * steps_log / el
            mfu = flops_tok * tps / (peak * layout.world_size) if peak else None
            rec = {"step": step, "loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"],
                   "tokens_per_s": tps, "samples_per_s": cfg.train.global_batch * steps_log / el,
                   "step_time_s": el / steps_log, "mfu": mfu, "data_wait_pct": 100.0 * wait_log / el,
                   "peak_mem_gb": dev.peak_memory_bytes(device) / 2 ** 30,
                   "tokens_seen": tokens_per_step * step}
            logger.log(rec, console=(f"step {step:>7d}  loss {out['loss']:.4f}  lr {rec['lr']:.2e}  "
                                     f"gnorm {out['grad_norm']:.3f}  {tps:,.0f} tok/s  "
                                     + (f"mfu {100 * mfu:.1f}%  " if mfu is not None else "")
                                     + f"data {rec['data_wait_pct']:.1f}%  mem {rec['peak_mem_gb']:.2f} GB"))
            t_log, wait_log, steps_log = time.perf_counter(), 0.0, 0
        stopped = preemption.stop_requested()
        last = step == cfg.train.max_steps
        every = cfg.train.checkpoint_every
        if stopped or last or (every and step % every == 0):
            save_checkpoint(cfg, par, step, loader, layout_info, ema, is_main, env.rank, revision=logger.revision)
        if stopped:
            logger.info(f"stop requested ({preemption.reason()}): checkpoint saved at step {step}, exiting")
            break
    logger.close()
    loader.close()
    return {"losses": losses, "step": step, "run_dir": str(run_dir), "stopped": stopped}


def save_checkpoint(cfg: TrainConfig, par, step: int, loader, layout_info: dict, ema, is_main: bool,
                    rank: int, revision: str) -> Path:
    run_dir = Path(cfg.run_dir)
    trainer_state = {"step": step, "samples_seen": step * cfg.train.global_batch, "data": loader.global_state_dict(),
                     "scheduler": {"last_epoch": step}}
    rank_state = {"rng": dev.rng_state(), "data": loader.state_dict()}
    path = ckpt_io.save(run_dir, step, par, trainer_state, rank_state, layout_info, keep=cfg.train.keep_checkpoints,
                        universal=cfg.train.universal_checkpoint, ema_shadow=ema.shadow if ema is not None else None)
    export_every = cfg.train.export_every or cfg.train.checkpoint_every
    due = not export_every or step % export_every == 0 or step == cfg.train.max_steps
    if is_main and ckpt_io.writes_universal(par, cfg.train.universal_checkpoint) and due:
        export(cfg, path, step, revision=revision)
    if is_main and ema is not None:
        export_ema(cfg, par, path, step)
    if dist.is_initialized():
        dist.barrier()
    return path


def export(cfg: TrainConfig, ckpt: Path, step: int, revision: str) -> Path:
    """Consolidated export RUN_DIR/exports/step-XXXXXXXX (config.json + model.safetensors) from a checkpoint.
    `revision`: the git revision, computed once by the logger."""
    import argen.model as argen_model
    params, _ = ckpt_io.read_universal(ckpt)
    model = GPT(cfg.model.gpt_config())
    ckpt_io.load_weights_into(model, params, str(ckpt))
    out = Path(cfg.run_dir) / "exports" / ckpt_io.tag_for(step)
    return argen_model.save(model, out, meta={"step": step, "checkpoint": str(ckpt),
                                              "git_revision": revision,
                                              "samples_seen": step * cfg.train.global_batch})


def export_ema(cfg: TrainConfig, par, ckpt: Path, step: int) -> Path:
    """EMA weights as a second export (…/step-XXXXXXXX-ema), assembled from the checkpoint's per-(stage, TP rank)
    EMA files (written by ckpt_io.save; TP shards joined here)."""
    import argen.model as argen_model
    from argen.parallel.tensor_parallel import unshard

    parts: dict[str, dict[int, torch.Tensor]] = {}
    for f in sorted((ckpt / "argen").glob("ema-pp*-tp*.safetensors")):
        t = int(f.stem.split("-tp")[1])
        for k, v in load_file(str(f)).items():
            parts.setdefault(k, {})[t] = v
    full = {k: unshard(k, [d[i] for i in sorted(d)]) for k, d in parts.items()}
    full.update({k: v for k, v in par.model.state_dict().items() if "uncond_embedding" in k})  # buffers
    model = GPT(cfg.model.gpt_config())
    ckpt_io.load_weights_into(model, full, "ema")
    return argen_model.save(model, Path(cfg.run_dir) / "exports" / f"{ckpt_io.tag_for(step)}-ema",
                            meta={"step": step, "ema_decay": cfg.optim.ema_decay})


def run(cfg: TrainConfig) -> int:
    train(cfg)
    return 0
