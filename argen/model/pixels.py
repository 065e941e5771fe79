"""Decoder output to pixels: the one [-1, 1] -> uint8 conversion, and PNG grids.

The conversion is the reference's, uint8(clamp(127.5·x + 128, 0, 255)) — equal to rounding — so samples, reconstructions,
served PNGs and evaluation batches all quantise the same way.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 of the same shape and layout."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, cols: int | None = None) -> None:
    """images (B, 3, H, W) in [-1, 1] -> one PNG, `cols` per row (default: nearly square), white padding."""
    import numpy as np
    from PIL import Image
    x = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    b, h, w, _ = x.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = x[i]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
