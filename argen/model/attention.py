"""The one attention entry point: flash-attn on an accelerator when it can serve the call, else PyTorch SDPA.

flash-attn needs half precision, no explicit mask and the (B, S, H, D) layout; everything else (CPU, fp32, padded
captions) goes to `F.scaled_dot_product_attention`, which on CPU is itself a flash-style kernel. The choice is logged
once per backend so a run's log says which kernel trained it.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from argen import device as dev

log = logging.getLogger(__name__)
_announced: set[str] = set()

try:  # optional GPU extra
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_func = None

BACKEND = os.environ.get("ARGEN_ATTN_BACKEND", "auto")  # auto | flash | sdpa


def _announce(name: str) -> None:
    if name not in _announced:
        _announced.add(name)
        log.info("attention backend: %s", name)


def flash_usable(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    return (flash_attn_func is not None and BACKEND in ("auto", "flash") and mask is None
            and dev.is_accelerator(q.device) and q.dtype in (torch.float16, torch.bfloat16))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """q, k, v: (B, H, S, D). mask: bool, True = may attend, broadcastable to (B, H, Sq, Sk). Returns (B, H, Sq, D)."""
    if flash_usable(q, mask):
        _announce("flash-attn")
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                              causal=is_causal)
        return out.transpose(1, 2)
    _announce("sdpa")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=is_causal and mask is None)
