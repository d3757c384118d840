"""FID statistics: float64 running sums, all-reduce across ranks, the Frechet distance, cached references.

Library use (each rank passing its own share; `extractor` from evaluation.inception.load_inception()):

    real = feature_stats(real_batches, extractor).all_reduce()   # iterables of uint8 (B, 3, H, W)
    fid = fid_from_stats(real, feature_stats(fake_batches, extractor).all_reduce())

Statistics are sums, so shards add: each rank accumulates n, sum x and sum x x^T in float64 (`FeatureStats`),
`all_reduce()` adds them across ranks, and the mean and the unbiased covariance (divisor n - 1, as
`numpy.cov` and torch-fidelity) come from the totals. The distance
    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)
is computed in float64 with two symmetric eigendecompositions (no scipy.linalg.sqrtm: S1^1/2 S2 S1^1/2 is
symmetric PSD and similar to S1 S2, so its eigenvalues give tr sqrt(S1 S2) directly and stably).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from evaluation.inception import FEATURE_DIM, INPUT_SIZE


class FeatureStats:
    """Running float64 sums of D-dim features: count n, sum x (D,), sum x x^T (D, D)."""

    def __init__(self, dim: int = 2048, device: str | torch.device = "cpu"):
        self.dim = dim
        self.n = torch.zeros((), dtype=torch.int64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, feats: torch.Tensor) -> None:
        """Add features (B, D), any float dtype; accumulated in float64 on this object's device."""
        if feats.dim() != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"expected features (B, {self.dim}), got {tuple(feats.shape)}")
        f = feats.to(self.sum.device, torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.t() @ f

    def all_reduce(self) -> FeatureStats:
        """Sum the statistics of all ranks in place (no-op without an initialised process group)."""
        if dist.is_available() and dist.is_initialized():
            for t in (self.n, self.sum, self.outer):
                dist.all_reduce(t)
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) in float64, unbiased covariance."""
        n = int(self.n)
        if n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {n}")
        s = self.sum.double().cpu().numpy()
        mu = s / n
        sigma = (self.outer.double().cpu().numpy() - n * np.outer(mu, mu)) / (n - 1)
        return mu, (sigma + sigma.T) / 2

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"n": self.n.cpu(), "sum": self.sum.cpu(), "outer": self.outer.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["sum"].shape != self.sum.shape:
            raise ValueError(f"feature dim mismatch: {tuple(state['sum'].shape)} vs {tuple(self.sum.shape)}")
        for name in ("n", "sum", "outer"):
            getattr(self, name).copy_(state[name])


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64 (see the module docstring)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(*a.mean_cov(), *b.mean_cov())


# ----------------------------------------------------------------------------------------------------------
# Reference statistics on disk (npz, no pickle)


def stats_key(manifest: dict | str | bytes, protocol: dict) -> str:
    """sha256 naming a set of reference statistics: the dataset manifest plus the protocol (image count,
    resize, Inception weights hash, ...). Any change gives a new key, so a stale cache is never reused."""
    if isinstance(manifest, dict):
        manifest = json.dumps(manifest, sort_keys=True)
    if isinstance(manifest, str):
        manifest = manifest.encode()
    h = hashlib.sha256(manifest)
    h.update(json.dumps(protocol, sort_keys=True).encode())
    return h.hexdigest()


def reference_stats_path(ref_stats_dir: str | None, manifest: bytes, num_images: int,
                         inception_sha256: str) -> Path | None:
    """Where the originals' cached statistics live: `ref_stats_dir` ("" = no cache; None = $DIVAE_CACHE_DIR or
    ~/.cache/divae, /fid_refs), named by the dataset manifest and the feature protocol (`stats_key`)."""
    if ref_stats_dir == "":
        return None
    ref_dir = (Path(os.environ.get("DIVAE_CACHE_DIR", Path.home() / ".cache" / "divae")) / "fid_refs"
               if ref_stats_dir is None else Path(ref_stats_dir))
    key = stats_key(manifest, {"num_images": num_images, "inception_sha256": inception_sha256,
                               "resize": f"tf1-bilinear-{INPUT_SIZE}", "dim": FEATURE_DIM})
    return ref_dir / f"fid_ref_{key[:24]}.npz"


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, n: int, meta: dict) -> None:
    """Write mu, sigma, n and a JSON `meta` to an .npz, atomically (several jobs may share a cache)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, mu=mu, sigma=sigma, n=np.int64(n), meta=np.array(json.dumps(meta, sort_keys=True)))
    os.replace(tmp, path)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int, dict]:
    """(mu, sigma, n, meta) from a file written by `save_stats`."""
    with np.load(path, allow_pickle=False) as z:
        return z["mu"], z["sigma"], int(z["n"]), json.loads(str(z["meta"]))


# ----------------------------------------------------------------------------------------------------------
# Quick FID for training loops


@torch.no_grad()
def feature_stats(batches: Iterable[torch.Tensor], extractor: torch.nn.Module) -> FeatureStats:
    """This rank's FeatureStats of uint8 image batches (B, 3, H, W); not yet all-reduced."""
    device = next(extractor.parameters()).device
    stats = None
    for images in batches:
        feats = extractor(images.to(device))
        if stats is None:
            stats = FeatureStats(feats.shape[1], device)
        stats.update(feats)
    if stats is None:
        raise ValueError("no image batches given")
    return stats
