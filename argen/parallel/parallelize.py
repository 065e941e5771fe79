"""`parallelize(model, pcfg, ocfg, ...)`: turn the plain GPT into a trainable (possibly distributed) step.

The order is the contract (torchtitan style: TP -> AC -> compile -> FSDP), each step a small function in this
package:

  1. layout      check tp x pp x dp against the world and the model's shape (heads, FFN, vocab, layers)
  2. topology    megatron-core parallel_state groups (only when tp > 1 or pp > 1; pure DP needs no megatron)
  3. TP          swap linears/embeddings for megatron-core layers holding this rank's weight slices
  4. AC          activation checkpointing on every block or every n-th block (torch.utils.checkpoint)
  5. compile     optional torch.compile of each block (any layout; every rank compiles its own blocks)
  6. PP          cut [embed, blocks..., head] into DeepSpeed PipelineModule stages
  7. optimizer   AdamW with the reference's decay groups (ndim >= 2 decays; 1-D norm weights do not) + LR schedule
  8. ZeRO        deepspeed.initialize(model, optimizer, config, mpu=MegatronMPU) -- ZeRO 0/1/2/3, bf16, clipping,
                 gradient accumulation

When tp = pp = dp = 1 (and `single_process_engine: torch`) steps 2, 3, 6 and 8 are skipped and the step is a plain
PyTorch loop (autocast bf16 + fp32 master weights, clip_grad_norm_, AdamW), so the parallel machinery costs nothing.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.checkpoint

from argen import device as dev
from argen.errors import ArgenError
from argen.model.gpt import GPT, gpt_loss
from argen.parallel.topology import Layout, MegatronMPU, check_layout_divisibility, init_model_parallel


# ---------------------------------------------------------------------------------------------------------------
# 4. activation checkpointing

def _checkpointed_forward(orig: Callable, x, rope, mask, start_pos=None):
    if start_pos is not None or not torch.is_grad_enabled():
        return orig(x, rope, mask, start_pos)
    return torch.utils.checkpoint.checkpoint(orig, x, rope, mask, use_reentrant=False)


def apply_activation_checkpointing(model: GPT, mode: str, every_n: int = 1) -> int:
    """Recompute the chosen blocks in backward; returns how many blocks are checkpointed. Names do not change."""
    if mode == "off":
        return 0
    n = 0
    for i, block in enumerate(model.layers):
        if mode == "every_block" or i % every_n == 0:
            block.forward = functools.partial(_checkpointed_forward, block.forward)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------------------------
# 7. optimizer and schedule

def param_groups(named_params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Reference decay rule (LlamaGen §5.2): weight decay on params with ndim >= 2 (all matrices and embedding
    tables), none on 1-D params (RMSNorm weights; this model has no biases)."""
    decay = [p for _, p in named_params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for _, p in named_params if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(schedule: str, warmup: int, max_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step s (0-based): linear warmup, then constant / cosine / linear."""
    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        span = max(max_steps - warmup, 1)
        t = min(max(s - warmup, 0) / span, 1.0)
        if schedule == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0 - (1 - min_ratio) * t
    return f


def make_optimizer(groups: list[dict], ocfg, device: torch.device) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = dict(lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps)
    if dev.is_accelerator(device):
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# 8. the DeepSpeed config

def deepspeed_config(layout: Layout, micro: int, accum: int, grad_clip: float, precision: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * layout.dp,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": layout.zero},
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,   # the client optimizer is torch.optim.AdamW
        "steps_per_print": 10 ** 12,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "IGNORE"},
    }


# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Parallelized:
    """What the loop drives: one `train_step(micro_batches)` per optimizer step, whatever the layout."""
    layout: Layout
    model: GPT                               # the plain root (its submodules may be TP layers)
    module: nn.Module                        # what is called: the model, or the PipelineModule stage
    optimizer: torch.optim.Optimizer | Any   # torch AdamW, or DeepSpeed's wrapper around it
    scheduler: Any
    engine: Any = None                       # DeepSpeed engine, None on the plain path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    grad_clip: float = 0.0
    param_names: dict[int, str] = field(default_factory=dict)   # id(param) -> plain-model name
    loss_fn: Callable = gpt_loss
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    dp_group: Any = None

    # ---- introspection used by checkpoints, EMA and logs ----------------------------------------------------
    def local_named_params(self) -> list[tuple[str, nn.Parameter]]:
        """(plain-model name, parameter) for every parameter this rank holds (its TP slice, its PP stage)."""
        return _local_named_params(self.module, self.param_names)

    def lr(self) -> float:
        opt = self.engine.optimizer if self.engine is not None else self.optimizer
        return float(opt.param_groups[0]["lr"])

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    # ---- one optimizer step ---------------------------------------------------------------------------------
    def _inputs(self, mb: dict) -> tuple:
        cond = mb["cond"]
        if cond.is_floating_point() and self.engine is not None and self.precision == "bf16":
            cond = cond.to(torch.bfloat16)
        return mb["codes"], cond, mb.get("cond_mask")

    def _loss(self, mb: dict) -> torch.Tensor:
        codes, cond, cond_mask = self._inputs(mb)
        dtype = torch.bfloat16 if (self.precision == "bf16" and self.engine is None) else None
        with dev.autocast(self.device, dtype):
            logits = self.module(codes, cond, cond_mask)
        return self.loss_fn(logits, codes, mb.get("valid"))

    def train_step(self, micro_batches: list[dict]) -> dict:
        """Forward/backward over the micro-batches and one optimizer step. Returns the global mean loss
        (all micro-batches, all data-parallel ranks) and the pre-clip gradient norm."""
        if self.layout.pp > 1:
            return self._pipeline_step(micro_batches)
        total = torch.zeros((), device=self.device)
        if self.engine is None:
            for mb in micro_batches:
                loss = self._loss(mb) / len(micro_batches)
                loss.backward()
                total += loss.detach()
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if self.grad_clip > 0:
                gn = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            else:
                gn = torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params
                                                           if p.grad is not None]))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            return {"loss": float(total), "grad_norm": float(gn)}
        for mb in micro_batches:
            loss = self._loss(mb)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float() / len(micro_batches)
        if self.layout.dp > 1:
            dist.all_reduce(total, group=self.dp_group)
            total /= self.layout.dp
        gn = self.engine.get_global_grad_norm()
        return {"loss": float(total), "grad_norm": float(gn) if gn is not None else float("nan")}

    def _pipeline_step(self, micro_batches: list[dict]) -> dict:
        def items():
            for mb in micro_batches:
                codes, cond, cond_mask = self._inputs(mb)
                inputs = (codes, cond) if cond_mask is None else (codes, cond, cond_mask.long())
                labels = (codes,) if mb.get("valid") is None else (codes, mb["valid"])
                yield inputs, labels
        loss = self.engine.train_batch(data_iter=items())
        gn = self.engine.get_global_grad_norm()
        return {"loss": float(loss), "grad_norm": float(gn) if gn is not None else float("nan")}


def _local_named_params(module: nn.Module, param_names: dict[int, str]) -> list[tuple[str, nn.Parameter]]:
    return [(param_names[id(p)], p) for p in module.parameters() if id(p) in param_names]


def _pipe_loss(tp: int):
    def loss_fn(logits, labels):
        codes = labels[0]
        valid = labels[1] if len(labels) > 1 else None
        if tp > 1:
            from argen.parallel.tensor_parallel import parallel_loss
            return parallel_loss(logits, codes, valid)
        return gpt_loss(logits, codes, valid)
    return loss_fn


def parallelize(model: GPT, layout: Layout, *, ocfg, micro_batch: int, accum: int, precision: str,
                max_steps: int, activation_checkpointing: str = "off", checkpoint_every_n: int = 1,
                compile: bool = False, force_deepspeed: bool = False, device: torch.device | None = None,
                ) -> Parallelized:
    """Apply the layout to a freshly built (or weight-loaded) plain GPT; see the module docstring for the order."""
    device = device or dev.default_device()
    # 1. layout
    world = dist.get_world_size() if dist.is_initialized() else 1
    if layout.world_size != world:
        raise ArgenError(f"parallel: tp x pp x dp = {layout.world_size} but the job has {world} processes")
    try:
        check_layout_divisibility(model.config, layout.tp, layout.pp)
    except ValueError as e:
        raise ArgenError(str(e)) from None
    rank = dist.get_rank() if dist.is_initialized() else 0
    coords = layout.coords(rank)
    param_names = _param_names(model)
    use_ds = force_deepspeed or not layout.is_single
    # 2. topology (DeepSpeed's communication layer wraps the existing process group)
    if use_ds:
        import deepspeed
        deepspeed.init_distributed(dist_backend=dev.dist_backend(), auto_mpi_discovery=False)
    mpu = None
    if layout.tp > 1 or layout.pp > 1:
        init_model_parallel(layout)
        mpu = MegatronMPU()
    # 3. tensor parallel
    loss_fn: Callable = gpt_loss
    if layout.tp > 1:
        from argen.parallel.tensor_parallel import apply_tensor_parallel, parallel_loss
        apply_tensor_parallel(model, layout.tp, coords["tp"])
        param_names = _param_names(model)
        loss_fn = parallel_loss
    # 4. activation checkpointing
    apply_activation_checkpointing(model, activation_checkpointing, checkpoint_every_n)
    # 5. compile (per block, after AC)
    if compile:
        for block in model.layers:
            block.compile()
    model.to(device)
    # 6. pipeline stages
    module: nn.Module = model
    if layout.pp > 1:
        from argen.parallel.pipeline import build_pipeline
        module = build_pipeline(model, layout, _pipe_loss(layout.tp))
        _mark_stage_params_for_grad_norm(module, coords)
    # 7. optimizer + schedule
    local = _local_named_params(module, param_names)
    optimizer = make_optimizer(param_groups(local, ocfg.weight_decay), ocfg, device)
    sched_fn = lr_lambda(ocfg.schedule, ocfg.warmup_steps, max_steps, ocfg.min_lr_ratio)
    if not use_ds:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, sched_fn)
        return Parallelized(layout, model, module, optimizer, scheduler, None, device, precision, ocfg.grad_clip,
                            param_names, loss_fn)
    # 8. DeepSpeed engine (ZeRO 0/1/2/3, bf16, clipping, accumulation)
    cfg = deepspeed_config(layout, micro_batch, accum, ocfg.grad_clip, precision)
    from deepspeed.utils import groups as ds_groups
    ds_groups.mpu = mpu if layout.pp == 1 else None  # DeepSpeed keeps the last engine's mpu in a global
    engine, ds_opt, _, ds_sched = deepspeed.initialize(
        model=module, optimizer=optimizer, config=cfg, mpu=mpu if layout.pp == 1 else None,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched_fn))
    if not (engine.bfloat16_enabled() or engine.zero_optimization()) and ocfg.grad_clip > 0:
        _record_fp32_grad_norm(engine)
    dp_group = mpu.get_data_parallel_group() if (mpu is not None and layout.dp > 1) else None  # None = world
    return Parallelized(layout, model, engine.module, ds_opt, ds_sched,
                        engine, device, precision, ocfg.grad_clip, param_names, loss_fn,
                        coords["tp"], coords["pp"], coords["dp"], dp_group)


def _mark_stage_params_for_grad_norm(module: nn.Module, coords: dict) -> None:
    """DeepSpeed's ZeRO/fp32 grad norm counts a parameter when it is model-parallel or when the rank's *model-parallel*
    rank is 0 -- under a pipeline that rank spans pipe x tensor, so replicated weights of later stages would never
    count and clipping would use too small a norm. Mark them model-parallel on tensor rank 0 of stages > 0: each
    replicated weight is then counted exactly once per stage, TP shards on every TP rank."""
    if coords["pp"] == 0 or coords["tp"] != 0:
        return
    for p in module.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            p.model_parallel = True


def _param_names(model: nn.Module) -> dict[int, str]:
    """id(param) -> plain-model name. Taken again after the TP swap: the parameter objects are new, the names are
    unchanged (the layers keep their names)."""
    return {id(p): n for n, p in model.named_parameters()}


def _record_fp32_grad_norm(engine) -> None:
    """DeepSpeed's ZeRO-0 fp32 path clips but discards the norm; keep it for the logs."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip():
        engine._global_grad_norm = float(clip_grad_norm_(parameters=engine.module.parameters(),
                                                         max_norm=engine.gradient_clipping(), mpu=engine.mpu))
    engine.clip_fp32_gradients = clip
