"""Fréchet distance between Gaussian fits of feature sets (FID on pool features, sFID on spatial features).

Follows the ADM evaluator (guided-diffusion evaluations/evaluator.py): float64 statistics, `np.cov` with the
unbiased estimator, scipy `sqrtm` of sigma1·sigma2 with an eps·I offset retry when it is not finite, and the
imaginary part dropped when it is numerically zero.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

from argen.errors import ArgenError


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples) in float64."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"features must be 2-d (N, D), got shape {feats.shape}")
    if len(feats) < 2:
        raise ArgenError(f"need at least 2 samples to estimate a covariance, got {len(feats)}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """d² = |mu1 - mu2|² + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ArgenError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape} (were both computed with the same feature network?)")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # scipy warns about singular products; the finite check below handles them the way ADM does.
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ArgenError(f"Fréchet distance: sqrtm has a large imaginary component "
                             f"{np.max(np.abs(covmean.imag)):.3g}; too few samples for the feature dimension?")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets (e.g. rFID: reconstructions vs originals)."""
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))
