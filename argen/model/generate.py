"""KV-cached sampling for the GPT: `argen.generate(model, cond, ...) -> codes (B, N)`.

Order per step, as LlamaGen's autoregressive/models/generate.py: CFG -> temperature -> top-k -> top-p -> draw
(argen.model.sampling, shared with the serving engine: CFG on the hidden state before the linear head, inverse-CDF
draw over the candidates).
The conditional and unconditional rows run as one batch [cond; uncond], so row i and row B+i always belong to the
same request. Caches are allocated once per call at the exact length needed; decode steps attend over the filled
prefix of the cache only, so no (B, S, S) mask is built (c2i) and only a key mask for padded captions (t2i).
"""
from __future__ import annotations

from typing import Callable

import torch

from argen.errors import ArgenError
from argen.model import sampling

CfgSchedule = None | str | int | Callable[[int, int], float]


def cfg_scale_at(step: int, total: int, scale: float, schedule: CfgSchedule) -> float:
    """CFG scale for image token `step` of `total`: constant (None), 'linear' ramp 1 -> scale, an int k
    (the reference's cfg_interval: its decode index i = step - 1 keeps CFG while i <= k), or a callable."""
    if schedule is None or schedule == "constant":
        return scale
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * step / max(total - 1, 1)
    if isinstance(schedule, int):
        return scale if schedule < 0 or step - 1 <= schedule else 1.0
    if callable(schedule):
        return float(schedule(step, total))
    raise ArgenError(f"unknown cfg_schedule {schedule!r} (None, 'constant', 'linear', an int interval or a callable)")


def uses_cfg(scale: float, schedule: CfgSchedule) -> bool:
    """Whether a request runs the unconditional rows: a scale above 1, or a non-constant schedule away from 1."""
    return scale > 1.0 or (schedule is not None and schedule != "constant" and scale != 1.0)


def parse_cfg_schedule(text: str | None) -> CfgSchedule:
    """A schedule given as text (CLI flags, protocol files): "constant", "linear" or an integer interval."""
    if text is None or text in ("constant", "linear"):
        return text
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ArgenError(f"cfg_schedule must be constant, linear or an integer, got '{text}'") from None


def check_condition(model, cond: torch.Tensor, cond_mask: torch.Tensor | None) -> None:
    cfg = model.config
    if cfg.model_type == "c2i":
        if cond.dtype not in (torch.int32, torch.int64) or cond.ndim != 1:
            raise ArgenError(f"c2i condition must be a 1-D tensor of class labels, got {tuple(cond.shape)} {cond.dtype}")
        if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= cfg.num_classes):
            raise ArgenError(f"class label out of range [0, {cfg.num_classes}): {cond.tolist()}")
    else:
        if cond.ndim != 3 or cond.shape[1] != cfg.cls_token_num or cond.shape[2] != cfg.caption_dim:
            raise ArgenError(f"t2i caption features must have shape (B, {cfg.cls_token_num}, {cfg.caption_dim}), "
                             f"got {tuple(cond.shape)}")
        if cond_mask is not None and tuple(cond_mask.shape) != tuple(cond.shape[:2]):
            raise ArgenError(f"caption mask must have shape {tuple(cond.shape[:2])}, got {tuple(cond_mask.shape)}")


@torch.no_grad()  # not inference_mode: callers may feed the codes to training
def generate(model, cond: torch.Tensor, *, cond_mask: torch.Tensor | None = None, cfg_scale: float = 1.0,
             cfg_schedule: CfgSchedule = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, greedy: bool = False, num_tokens: int | None = None) -> torch.Tensor:
    """Sample image codes (B, N) for labels (B,) or caption features (B, T, D) with an optional bool mask (B, T)."""
    check_condition(model, cond, cond_mask)
    cfg = model.config
    device = model.output.weight.device
    B, T = cond.shape[0], cfg.cls_token_num
    N = num_tokens or cfg.block_size
    use_cfg = uses_cfg(cfg_scale, cfg_schedule)
    cond = cond.to(device)
    if use_cfg:
        cond = torch.cat([cond, model.null_condition(B, device).to(cond.dtype)])
        if cond_mask is not None:  # the uncond half keeps the prompt's mask, as in training (LlamaGen generate.py)
            cond_mask = torch.cat([cond_mask, cond_mask])
    rows = cond.shape[0]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    was_training = model.training
    model.eval()
    model.setup_kv_cache(rows, T + N - 1)
    try:
        mask = None
        key_mask = None
        if cond_mask is not None:
            cond_mask = cond_mask.to(device).bool()
            mask = model.prefix_mask(cond_mask, T)
            key_mask = torch.ones(rows, T + N, dtype=torch.bool, device=device)
            key_mask[:, :T] = cond_mask
        x = model.embed_condition(cond).to(model.tok_embeddings.weight.dtype)
        hidden = model.hidden_cached(x, 0, mask)
        out = torch.empty(B, N, dtype=torch.long, device=device)
        for step in range(N):
            if use_cfg:
                hidden = sampling.guide(hidden[:B], hidden[B:], cfg_scale_at(step, N, cfg_scale, cfg_schedule))
            logits = model.output(hidden).float()
            if greedy:
                tok = logits.argmax(-1)
            else:
                tok = sampling.sample(logits, sampling.uniforms(B, generator, device), temperature, top_k, top_p)
            out[:, step] = tok
            if step == N - 1:
                break
            tok_in = torch.cat([tok, tok]) if use_cfg else tok
            pos = T + step
            step_mask = None if key_mask is None else key_mask[:, None, None, : pos + 1]
            hidden = model.hidden_cached(model.tok_embeddings(tok_in)[:, None], pos, step_mask)
        return out
    finally:
        model.clear_kv_cache()
        model.train(was_training)
