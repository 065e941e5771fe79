"""Tokenizer quality metrics: PSNR, SSIM and codebook usage, on images in [-1, 1].

Both image metrics quantise to uint8 first, like the reference's evaluation (clamp(127.5·x + 128, 0, 255)), then
work on [0, 1] pixels with data_range = 1. SSIM follows scikit-image's defaults (7x7 uniform window, sample
covariance, K1 0.01, K2 0.03, per-channel mean, border of 3 px excluded) with the correct data range: the reference
passes data_range=2.0 for [0, 1] images, which inflates SSIM (its published 0.675 is on that inflated scale).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from argen.model.pixels import to_uint8


def _unit(x: torch.Tensor) -> torch.Tensor:
    return to_uint8(x).double() / 255.0


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB between (B, 3, H, W) batches in [-1, 1] (data range 1 after uint8 quantisation)."""
    mse = (_unit(x) - _unit(y)).pow(2).mean(dim=(1, 2, 3))
    return (10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))).float()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 7) -> torch.Tensor:
    """Per-image SSIM between (B, 3, H, W) batches in [-1, 1] (scikit-image's algorithm, see module doc)."""
    a, b = _unit(x), _unit(y)
    if min(a.shape[-2:]) < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size}, got {tuple(a.shape[-2:])}")
    # only the valid region: skimage crops (win_size - 1) // 2 pixels, exactly the border a padded filter would touch
    f = lambda t: F.avg_pool2d(t, win_size, stride=1)  # noqa: E731
    ua, ub = f(a), f(b)
    n = win_size * win_size
    cov = n / (n - 1)
    vaa, vbb, vab = cov * (f(a * a) - ua * ua), cov * (f(b * b) - ub * ub), cov * (f(a * b) - ua * ub)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ua * ub + c1) * (2 * vab + c2)) / ((ua * ua + ub * ub + c1) * (vaa + vbb + c2))
    return s.mean(dim=(1, 2, 3)).float()


def codebook_usage(counts: torch.Tensor) -> float:
    """Fraction of codebook entries used at least once, from a (codebook_size,) histogram of assignments."""
    return float((counts > 0).sum()) / counts.numel()
