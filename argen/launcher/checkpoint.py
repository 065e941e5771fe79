"""Training checkpoints: DeepSpeed's per-rank layout for exact resume, plus a layout-free copy for re-sharding.

    RUN_DIR/checkpoints/
      latest                                  tag of the newest complete checkpoint (written last)
      step-00001000/
        mp_rank_00_model_states.pt, ...       DeepSpeed engine files (engine.save_checkpoint), when an engine runs
        argen/
          layout.json                         {tp, pp, dp, zero, precision, engine, world_size, global_batch}
          trainer.json                        step, samples seen, LR-scheduler state, global data position
          rank-00000.pt ...                   per rank: RNG states and the data-loader state
          ema-pp00-tp00.safetensors ...       EMA shadow of each (pipeline stage, TP rank), when optim.ema is on
                                              (written once, by data-parallel rank 0: the replicas hold the same)
          universal/params-pp00-tp00.safetensors ...
                                              fp32 master weights + AdamW moments (exp_avg, exp_avg_sq) of each
                                              (pipeline stage, TP rank), gathered over data-parallel/ZeRO shards,
                                              under plain-model names; `unshard` rebuilds the full tensors
          COMPLETE                            written after every rank finished
    RUN_DIR/exports/step-00001000/            config.json + model.safetensors (argen.model.save), read by eval

Resume: with the same layout and a DeepSpeed engine, `engine.load_checkpoint` restores the engine's own files and
each rank its RNG and loader state: the continuation is bit-exact. Under a different tp/pp/dp/ZeRO layout (or on the
plain single-process path) the universal files are consolidated, loaded into the plain model before
`parallelize`, and the optimizer moments are re-sharded into whatever optimizer the new layout built.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from argen.errors import ArgenError
from argen.parallel.tensor_parallel import shard, unshard

OPT_KEYS = ("exp_avg", "exp_avg_sq")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# finding checkpoints

def is_complete(ckpt: Path) -> bool:
    return (ckpt / "argen" / "COMPLETE").is_file()


def latest(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint under RUN_DIR/checkpoints (a half-written one is ignored)."""
    if not ckpt_root.is_dir():
        return None
    tags = sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step-") and is_complete(p))
    return tags[-1] if tags else None


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    if resume in ("none", "", "false", "no"):
        return None
    if resume == "auto":
        return latest(run_dir / "checkpoints")
    p = Path(resume)
    if p.is_dir() and is_complete(p):
        return p
    newest = latest(p)
    if newest is not None:
        return newest
    raise ArgenError(f"train.resume: {resume} is not a complete argen checkpoint directory")


def read_json(ckpt: Path, name: str) -> dict:
    return json.loads((ckpt / "argen" / name).read_text())


# ---------------------------------------------------------------------------------------------------------------
# gathering full (over DP/ZeRO) fp32 params and optimizer moments of this rank's local parameters

def _ds_opt(par):
    return par.engine.optimizer if par.engine is not None else None


def _has_zero_mapping(p) -> bool:
    # a ZeRO-1/2 parameter whose fragment lives on another rank has _hp_mapping None but still takes part in
    # the gathering collective
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def local_full_state(par) -> dict[str, torch.Tensor]:
    """{'param.NAME', 'exp_avg.NAME', 'exp_avg_sq.NAME'} for this rank's TP/PP slice, complete over DP shards.
    A collective over the data-parallel group under ZeRO: every rank must call it."""
    out: dict[str, torch.Tensor] = {}
    base_opt = par.optimizer if par.engine is None else _ds_opt(par)
    keep = par.dp_rank == 0  # the writer; the other data-parallel ranks only take part in the gathers
    _relink(par)
    for name, p in par.local_named_params():
        if par.engine is not None and _has_zero_mapping(p):
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
            v = safe_get_full_fp32_param(p)
            if keep:
                out[f"param.{name}"] = v.detach().float().cpu().clone()
            for k in OPT_KEYS:
                v = safe_get_full_optimizer_state(p, k)
                if keep:
                    out[f"{k}.{name}"] = (v.detach().float().cpu().clone() if v is not None
                                          else torch.zeros(p.shape, dtype=torch.float32))
        elif keep:
            out[f"param.{name}"] = p.detach().float().cpu().clone()
            state = base_opt.state.get(p, {}) if hasattr(base_opt, "state") else {}
            for k in OPT_KEYS:
                v = state.get(k)
                out[f"{k}.{name}"] = (v.detach().float().cpu().clone() if v is not None
                                      else torch.zeros(p.shape, dtype=torch.float32))
    return out


# ---------------------------------------------------------------------------------------------------------------
# save

def writes_universal(par, requested: bool) -> bool:
    """Whether a save writes the layout-free copy: when requested, and always without DeepSpeed (no other copy)."""
    return requested or par.engine is None


def ema_path(ckpt: Path, par) -> Path:
    return ckpt / "argen" / f"ema-pp{par.pp_rank:02d}-tp{par.tp_rank:02d}.safetensors"


def save(run_dir: Path, step: int, par, trainer_state: dict, rank_state: dict, layout_info: dict,
         keep: int = 0, universal: bool = True, ema_shadow: dict | None = None) -> Path:
    """Write checkpoint `step-XXXXXXXX` (all ranks call this). `universal=False` skips the layout-free copy
    (DeepSpeed's files only: a same-layout resume still works, re-sharding and exports of it do not)."""
    root = run_dir / "checkpoints"
    tag = tag_for(step)
    ckpt = root / tag
    rank = _rank()
    if rank == 0:
        if ckpt.exists():
            shutil.rmtree(ckpt)
        (ckpt / "argen" / "universal").mkdir(parents=True, exist_ok=True)
    _barrier()
    if par.engine is not None:
        par.engine.save_checkpoint(str(root), tag=tag, client_state={"argen_step": step}, save_latest=False)
    full = local_full_state(par) if writes_universal(par, universal) else None
    if full is not None and par.dp_rank == 0:
        buffers = {}
        if par.pp_rank == 0 and par.tp_rank == 0:
            buffers = {f"buffer.{k}": v.detach().float().cpu().contiguous()
                       for k, v in par.model.state_dict().items() if "uncond_embedding" in k}
        save_file({**{k: v.contiguous() for k, v in full.items()}, **buffers},
                  str(ckpt / "argen" / "universal" / f"params-pp{par.pp_rank:02d}-tp{par.tp_rank:02d}.safetensors"))
    torch.save(rank_state, ckpt / "argen" / f"rank-{rank:05d}.pt")
    if ema_shadow is not None and par.dp_rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema_shadow.items()}, str(ema_path(ckpt, par)))
    _barrier()
    if rank == 0:
        (ckpt / "argen" / "layout.json").write_text(json.dumps(layout_info, indent=2))
        (ckpt / "argen" / "trainer.json").write_text(json.dumps(trainer_state, indent=2, default=_json_default))
        (ckpt / "argen" / "COMPLETE").write_text("ok\n")
        (root / "latest").write_text(tag + "\n")
        if keep:
            done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and is_complete(p))
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return ckpt


def _json_default(o: Any):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


# ---------------------------------------------------------------------------------------------------------------
# consolidate

def read_universal(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Full plain-model state dict (params + persistent buffers) and {name: {exp_avg, exp_avg_sq}}."""
    layout = read_json(ckpt, "layout.json")
    files = sorted((ckpt / "argen" / "universal").glob("params-pp*-tp*.safetensors"))
    if not files:
        raise ArgenError(f"{ckpt} has no layout-free copy (saved with train.universal_checkpoint=false): resume it "
                         f"with its own layout {json.dumps({k: layout[k] for k in ('tp', 'pp', 'dp', 'zero')})}")
    by_tp: dict[str, dict[int, torch.Tensor]] = {}
    buffers: dict[str, torch.Tensor] = {}
    for f in files:
        tp_rank = int(f.stem.split("-tp")[1])
        for k, v in load_file(str(f)).items():
            if k.startswith("buffer."):
                buffers[k[len("buffer."):]] = v
            else:
                by_tp.setdefault(k, {})[tp_rank] = v
    tp = int(layout["tp"])
    full: dict[str, torch.Tensor] = {}
    for k, parts in by_tp.items():
        kind, name = k.split(".", 1)
        if len(parts) != tp and len(parts) != 1:
            raise ArgenError(f"{ckpt}: {k} has {len(parts)} of {tp} tensor-parallel shards")
        full[k] = unshard(name, [parts[i] for i in sorted(parts)])
    params = {k[len("param."):]: v for k, v in full.items() if k.startswith("param.")}
    params.update(buffers)
    optim = {}
    for k, v in full.items():
        kind, name = k.split(".", 1)
        if kind in OPT_KEYS:
            optim.setdefault(name, {})[kind] = v
    return params, optim


def load_weights_into(model: torch.nn.Module, params: dict[str, torch.Tensor], source: str) -> None:
    """Strict load of consolidated weights into a plain model (dtype/device follow the model)."""
    from argen.model.io import load_state_strict
    state = model.state_dict()
    cast = {k: v.to(dtype=state[k].dtype) if k in state else v for k, v in params.items()}
    load_state_strict(model, cast, source)


# ---------------------------------------------------------------------------------------------------------------
# re-shard optimizer moments into the optimizer the current layout built

def _relink(par) -> None:
    """(Re)point DeepSpeed's per-parameter fragments at the optimizer's current flat state tensors."""
    opt = _ds_opt(par)
    if opt is not None and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        if hasattr(opt, "_hp_optimizer_states_linked"):
            opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _materialize_optimizer_state(par, step: int) -> None:
    """Create empty AdamW state (moments 0, `step` taken) for every parameter the optimizer updates, and let
    DeepSpeed link its per-parameter fragments, so the moments can then be written per parameter."""
    opt = _ds_opt(par) if par.engine is not None else par.optimizer
    base = getattr(opt, "optimizer", opt) if par.engine is not None else opt
    flats = None
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat"):
        if hasattr(opt, attr):
            flats = list(getattr(opt, attr))
            break
    if flats is None:
        flats = [p for g in base.param_groups for p in g["params"]]
    fused = bool(base.defaults.get("fused")) if hasattr(base, "defaults") else False
    for f in flats:
        st = base.state[f]
        st["step"] = torch.tensor(float(step), dtype=torch.float32, device=f.device if fused else "cpu")
        st["exp_avg"] = torch.zeros_like(f, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(f, memory_format=torch.preserve_format)
    _relink(par)


def restore_optimizer(par, params: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]],
                      step: int) -> None:
    """Write the consolidated moments (and fp32 master weights) into this layout's optimizer."""
    _materialize_optimizer_state(par, step)
    base_opt = par.optimizer
    for name, p in par.local_named_params():
        if name not in optim:
            raise ArgenError(f"checkpoint has no optimizer state for {name}")
        tp, r = par.layout.tp, par.tp_rank
        if par.engine is not None and _has_zero_mapping(p):
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
            dev_ = p.device
            safe_set_full_fp32_param(p, shard(name, params[name], tp, r).to(dev_, torch.float32))
            for k in OPT_KEYS:
                safe_set_full_optimizer_state(p, shard(name, optim[name][k], tp, r).to(dev_, torch.float32), k)
        else:
            st = base_opt.state[p]
            for k in OPT_KEYS:
                st[k].copy_(shard(name, optim[name][k], tp, r).to(st[k].device, st[k].dtype))
