"""evaluation.fid: the Frechet distance, float64 running statistics, the reference-statistics cache."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from evaluation.fid import (
    FeatureStats,
    feature_stats,
    fid_from_stats,
    frechet_distance,
    load_stats,
    save_stats,
    stats_key,
)


def random_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or 2 * d))
    return a @ a.T / a.shape[1]


def test_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_self_distance_is_zero_and_symmetric():
    rng = np.random.default_rng(1)
    d = 64
    mu, s = rng.standard_normal(d), random_spd(rng, d)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6
    mu2, s2 = rng.standard_normal(d), random_spd(rng, d)
    ab, ba = frechet_distance(mu, s, mu2, s2), frechet_distance(mu2, s2, mu, s)
    assert ab > 1.0
    assert ab == pytest.approx(ba, rel=1e-9)


@pytest.mark.parametrize("rank", [None, 20])  # full rank, and rank-deficient (fewer samples than dims)
def test_agrees_with_scipy_sqrtm(rank):
    rng = np.random.default_rng(2)
    d = 48
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d, rank), random_spd(rng, d, rank)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6, abs=1e-6)


def test_feature_stats_match_numpy_mean_and_cov():
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(50, 8, generator=g) * 3 + 1
    stats = FeatureStats(dim=8)
    for chunk in feats.split(7):  # uneven chunks: sums must not care
        stats.update(chunk)
    mu, sigma = stats.mean_cov()
    x = feats.double().numpy()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert int(stats.n) == 50 and stats.sum.dtype == torch.float64

    other = FeatureStats(dim=8)
    other.update(feats[:10])
    half = FeatureStats(dim=8)
    half.update(feats[10:])
    torch.testing.assert_close(other.outer + half.outer, stats.outer)  # sums add across shards
    assert int(other.n + half.n) == 50
    assert fid_from_stats(stats, stats) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="expected features"):
        stats.update(torch.zeros(3, 5))


def test_state_dict_round_trip():
    stats = FeatureStats(dim=4)
    stats.update(torch.arange(12.0).reshape(3, 4))
    copy = FeatureStats(dim=4)
    copy.load_state_dict(stats.state_dict())
    assert torch.equal(copy.outer, stats.outer) and int(copy.n) == 3


def test_reference_stats_file_and_key(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma = rng.standard_normal(5), random_spd(rng, 5)
    path = tmp_path / "ref.npz"
    save_stats(path, mu, sigma, 123, {"protocol": "x"})
    mu2, sigma2, n, meta = load_stats(path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2) and n == 123 and meta == {"protocol": "x"}
    k = stats_key({"shards": ["a"]}, {"num_images": 10})
    assert k == stats_key({"shards": ["a"]}, {"num_images": 10})
    assert k != stats_key({"shards": ["a"]}, {"num_images": 11})
    assert k != stats_key({"shards": ["b"]}, {"num_images": 10})


class PooledProjection(torch.nn.Module):
    """uint8 (B, 3, H, W) -> (B, 6): a small fixed feature map standing in for the Inception."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 4 * 4, 6)

    def forward(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1))


@torch.no_grad()
def test_feature_stats_library_api():
    """Batches in, one float out, equal to the distance of the features' moments."""
    g = torch.Generator().manual_seed(4)
    real = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g)
    fake = (real.int() // 2 + 100).byte()
    net = PooledProjection().requires_grad_(False)
    fr, ff = net(real).double().numpy(), net(fake).double().numpy()
    expected = frechet_distance(fr.mean(0), np.cov(fr, rowvar=False), ff.mean(0), np.cov(ff, rowvar=False))
    got = fid_from_stats(feature_stats(real.split(16), net).all_reduce(),  # uneven batches: 16, 16, 8
                         feature_stats(fake.split(16), net).all_reduce())
    assert got == pytest.approx(expected, rel=1e-9) and got > 1e-3
