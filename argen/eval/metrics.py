"""Inception Score, improved precision/recall, PSNR and SSIM, with the ADM evaluator's definitions.

- IS: softmax of the (bias-free) logits, split into consecutive chunks of 5000 *in file order*, exp of the mean
  KL(p(y|x) ‖ p(y)) per chunk, averaged over chunks (the last chunk may be shorter, as in ADM).
- Precision/recall (Kynkäänniemi et al. 2019, as ADM's ManifoldEstimator): each set's manifold is the union of
  balls around its points with radius = distance to the k-th nearest neighbour (k=3, the point itself not counted).
  Precision = share of samples inside the reference manifold; recall = share of reference points inside the sample
  manifold. Squared Euclidean distances, like ADM (the comparison is the same).
- PSNR/SSIM on uint8 images with data range 255. SSIM uses scikit-image's defaults (7×7 uniform window, sample
  covariance, K1=0.01, K2=0.03) averaged over channels; the reference passed data_range=2.0 for [0,1] images,
  which inflates SSIM, so numbers are not comparable to its table.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import rel_entr, softmax

from argen.errors import ArgenError


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """IS from pre-softmax logits (N, C)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise ArgenError(f"inception_score needs a non-empty (N, classes) array, got shape {logits.shape}")
    return inception_score_from_probs(softmax(logits, axis=1), split_size)


def inception_score_from_probs(probs: np.ndarray, split_size: int = 5000) -> float:
    probs = np.asarray(probs, dtype=np.float64)
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size]
        # rel_entr gives 0·log 0 = 0 where ADM's formula would give NaN for exactly-zero probabilities.
        kl = rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    na = (a * a).sum(1, keepdim=True)
    nb = (b * b).sum(1, keepdim=True).t()
    return (na - 2 * a @ b.t() + nb).clamp_min_(0)


def manifold_radii(feats: torch.Tensor, k: int = 3, batch: int = 10000) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour within the set (self excluded)."""
    if len(feats) <= k:
        raise ArgenError(f"precision/recall with k={k} needs more than {k} points per set, got {len(feats)}")
    out = []
    for i in range(0, len(feats), batch):
        d = _sq_dists(feats[i:i + batch], feats)
        # The smallest is the point itself (distance 0), so the (k+1)-th smallest is the k-th neighbour.
        out.append(torch.topk(d, k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = 3, batch: int = 10000,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """(precision, recall) of `samples` against `ref` features, k-NN manifolds with k=3 like ADM."""
    r = torch.as_tensor(np.asarray(ref), dtype=torch.float32, device=device)
    s = torch.as_tensor(np.asarray(samples), dtype=torch.float32, device=device)
    if r.ndim != 2 or s.ndim != 2 or r.shape[1] != s.shape[1]:
        raise ArgenError(f"feature sets do not match: {tuple(r.shape)} vs {tuple(s.shape)}")
    radii_r, radii_s = manifold_radii(r, k, batch), manifold_radii(s, k, batch)
    s_in_r = torch.zeros(len(s), dtype=torch.bool, device=device)
    r_in_s = torch.zeros(len(r), dtype=torch.bool, device=device)
    for i in range(0, len(r), batch):
        for j in range(0, len(s), batch):
            d = _sq_dists(r[i:i + batch], s[j:j + batch])
            s_in_r[j:j + batch] |= (d <= radii_r[i:i + batch, None]).any(0)
            r_in_s[i:i + batch] |= (d <= radii_s[None, j:j + batch]).any(1)
    return float(s_in_r.double().mean()), float(r_in_s.double().mean())


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ArgenError(f"image batches must both be N×H×W×3 with equal shapes, got {a.shape} and {b.shape}")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-image PSNR (dB) of uint8 N×H×W×3 batches; identical images count as 100 dB."""
    _check_pair(a, b)
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        vals = np.where(mse == 0, 100.0, 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-300)))
    return float(vals.mean())


def ssim(a: np.ndarray, b: np.ndarray, win: int = 7, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM of uint8 N×H×W×3 batches (scikit-image defaults, data range 255, mean over channels)."""
    _check_pair(a, b)
    x = torch.tensor(a, dtype=torch.float64).permute(0, 3, 1, 2)
    y = torch.tensor(b, dtype=torch.float64).permute(0, 3, 1, 2)
    c1, c2 = (k1 * 255) ** 2, (k2 * 255) ** 2
    n = win * win
    mean = lambda t: F.avg_pool2d(t, win, stride=1)  # noqa: E731  ('valid' window, skimage crops the border)
    ux, uy = mean(x), mean(y)
    cov = n / (n - 1)  # sample covariance, as skimage's use_sample_covariance=True
    vx, vy = cov * (mean(x * x) - ux * ux), cov * (mean(y * y) - uy * uy)
    vxy = cov * (mean(x * y) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s.mean(dim=(1, 2, 3)).mean())
