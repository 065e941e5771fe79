"""Prompts -> caption features laid out as the t2i model was trained: right-aligned in `slots` rows, zero padding
on the left, a bool mask true on the valid rows (the layout of argen.data_pipeline.collate and the reference)."""
from __future__ import annotations

import torch

from argen.errors import ArgenError


def right_align(features: list[torch.Tensor], slots: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt (L_i, dim) features -> (n, slots, dim) float32 and (n, slots) bool; long prompts keep their
    first `slots` rows (the encoder already truncates at its max length)."""
    out = torch.zeros(len(features), slots, dim)
    mask = torch.zeros(len(features), slots, dtype=torch.bool)
    for i, f in enumerate(features):
        if f.ndim != 2 or f.shape[1] != dim:
            raise ArgenError(f"text encoder returned features of shape {tuple(f.shape)}, expected (L, {dim})")
        f = f[:slots]
        n = f.shape[0]
        if n:
            out[i, slots - n:] = f.float()
            mask[i, slots - n:] = True
    return out, mask


class PromptEncoder:
    """Callable prompts -> (features, mask) over argen.model.text_encoder.T5TextEncoder; prompts are cleaned as the
    training captions were (the reference's T5 embedder cleans at sampling time too)."""

    def __init__(self, path: str, slots: int, dim: int, device="cpu", dtype: torch.dtype = torch.float32):
        from argen.model.text_encoder import T5TextEncoder

        self.encoder = T5TextEncoder(path, device=device, dtype=dtype, max_length=slots)
        if self.encoder.dim != dim:
            raise ArgenError(f"T5 at {path} has d_model {self.encoder.dim} but the GPT expects caption_dim {dim}")
        self.slots, self.dim = slots, dim

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from argen.model.text_encoder import clean_caption

        return right_align(self.encoder.encode([clean_caption(p) for p in prompts]), self.slots, self.dim)
