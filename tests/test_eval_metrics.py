"""Metric definitions against independent computations and constructed distributions."""
import numpy as np
import pytest
from scipy import linalg

from argen.errors import ArgenError
from argen.eval.fid import feature_stats, fid_from_features, frechet_distance
from argen.eval.metrics import inception_score, inception_score_from_probs, precision_recall, psnr, ssim


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _fd_eig(mu1, s1, mu2, s2):
    # Independent route: tr((S1 S2)^½) = Σ √λ of the symmetric S1^½ S2 S1^½ (eigvalsh, not sqrtm of the product).
    r1 = linalg.sqrtm(s1).real
    lam = np.clip(linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam).sum())


def test_frechet_distance_matches_independent_scipy():
    rng = np.random.default_rng(0)
    for d in (1, 5, 32):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_fd_eig(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)


def test_frechet_distance_closed_form_diagonal():
    # For diagonal covariances the distance is |Δμ|² + Σ (√a − √b)².
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    want = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-9)


def test_fid_from_samples_of_known_gaussians():
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, size=(20000, 4))
    y = rng.normal(0.5, 2.0, size=(20000, 4))
    # true value: 4·0.25 + 4·(1 − 2)² = 5
    assert fid_from_features(x, y) == pytest.approx(5.0, abs=0.15)
    mu, sigma = feature_stats(x)
    assert np.allclose(sigma, np.cov(x, rowvar=False)) and mu.shape == (4,)


def test_frechet_distance_singular_covariance_and_mismatch():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 16))  # fewer samples than dims: rank-deficient covariance, eps fallback path
    val = fid_from_features(x, x + 1.0)
    assert np.isfinite(val) and val == pytest.approx(16.0, rel=1e-3)
    with pytest.raises(ArgenError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_constructed():
    n, c = 10000, 1008
    uniform = np.full((n, c), 1.0 / c)
    assert inception_score_from_probs(uniform) == pytest.approx(1.0)
    onehot = np.zeros((n, c))
    onehot[np.arange(n), np.arange(n) % 100] = 1.0  # 100 classes equally often in every split of 5000
    assert inception_score_from_probs(onehot) == pytest.approx(100.0)
    # logits path: very confident logits give the one-hot value; the splits are taken in file order
    logits = np.where(onehot > 0, 50.0, 0.0)
    assert inception_score(logits) == pytest.approx(100.0, rel=1e-6)
    sorted_onehot = onehot[np.argsort(np.arange(n) % 100, kind="stable")]
    # class-sorted order: each split of 5000 holds 50 classes -> IS 50, the ADM order dependence
    assert inception_score_from_probs(sorted_onehot) == pytest.approx(50.0)


def test_precision_recall_constructed_manifolds():
    rng = np.random.default_rng(3)
    ref = rng.uniform(0, 1, size=(400, 2))
    inside = rng.uniform(0.2, 0.8, size=(300, 2))  # covers only the middle of the reference square
    far = rng.uniform(10, 11, size=(300, 2))
    p, r = precision_recall(ref, inside)
    assert p > 0.97 and r < 0.6
    p, r = precision_recall(ref, far)
    assert p == 0.0 and r == 0.0
    p, r = precision_recall(ref, ref.copy())
    assert p == 1.0 and r == 1.0
    # batching does not change the answer
    assert precision_recall(ref, inside, batch=37) == precision_recall(ref, inside)


def test_precision_recall_k_neighbour_radius():
    # Points on a line at 0,1,2,...: with k=3 the radius of an inner point is 2 (its 3rd neighbour, self excluded)
    ref = np.arange(10, dtype=np.float64)[:, None]
    assert precision_recall(ref, np.array([[4.5], [5.0], [20.0], [-2.9]]))[0] == pytest.approx(0.75)
    with pytest.raises(ArgenError, match="more than 3"):
        precision_recall(ref[:3], ref[:3])


def test_psnr_ssim():
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + 5, 0, 255).astype(np.uint8)
    mse = ((a.astype(float) - b) ** 2).reshape(3, -1).mean(1)
    assert psnr(a, b) == pytest.approx(np.mean(10 * np.log10(255 ** 2 / mse)))
    assert psnr(a, a) == 100.0
    assert ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, noisy) < ssim(a, b) < 1.0
    assert ssim(a, noisy) == pytest.approx(ssim(noisy, a))
    with pytest.raises(ArgenError):
        psnr(a, a[:, :16])
