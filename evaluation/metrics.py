"""Per-image reconstruction metrics and codebook statistics.

Images are uint8 (B, 3, H, W) (or (B, H, W, 3) where said); every figure is computed on the uint8 values the
FID also sees, with data range 255.
- PSNR: 10 log10(255^2 / MSE) per image (MSE over all pixels and channels in float64), then averaged over
  images; an exact reconstruction has PSNR inf.
- SSIM: the figure of scikit-image's `structural_similarity` with the settings of Wang et al. 2004 (Gaussian
  window sigma 1.5 truncated at 3.5 sigma: 11 taps, population covariances, K1 0.01, K2 0.03,
  data_range=255, the 5-pixel border excluded from the mean, RGB channels averaged), computed on the
  images' device in float64 (`ssim`); `ssim_skimage` is scikit-image itself on the CPU (the reference,
  ~0.09 s per 256x256 image on one core).
- LPIPS: `divae.lpips.LPIPS` (VGG16 + linear heads) on [-1, 1] floats, when its weights are present.
- Codebook usage (fraction of the K codes used at least once over the set) and perplexity
  exp(-sum p log p) of the code histogram.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from skimage.metrics import structural_similarity


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != torch.uint8 or b.dtype != torch.uint8 or a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"expected two uint8 (B, 3, H, W) batches of one shape, got {a.dtype} "
                         f"{tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (B,) float64 of uint8 batches."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(255.0**2 / mse)  # mse 0 -> inf


SSIM_SIGMA, SSIM_RADIUS = 1.5, 5  # scikit-image: truncate 3.5 -> radius int(3.5 * 1.5 + 0.5) = 5


def _gaussian_taps(device: torch.device) -> torch.Tensor:
    """scipy.ndimage's normalised 1-D Gaussian (sigma 1.5, radius 5), float64 (11,)."""
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    w = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return w / w.sum()


def _filter_valid(x: torch.Tensor, taps: torch.Tensor, dim: int) -> torch.Tensor:
    """'valid' correlation of x with the 1-D `taps` along `dim` (length L -> L - len(taps) + 1), as a sum of
    shifted slices (memory-bound, several times faster than a depthwise float64 conv on a CPU)."""
    n = x.shape[dim] - taps.numel() + 1
    out = x.narrow(dim, 0, n) * taps[0]
    for k in range(1, taps.numel()):
        out.add_(x.narrow(dim, k, n), alpha=float(taps[k]))
    return out


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (B,) float64 of uint8 (B, 3, H, W) batches on their device (equals `ssim_skimage`).

    The five local moments (means, variances, covariance) are separable 11-tap Gaussian filters in float64
    over the 'valid' region only: scikit-image filters with reflected borders and then drops a 5-pixel
    border, exactly the pixels whose window reaches the padding, so the valid region gives its figure."""
    _check_pair(a, b)
    if min(a.shape[-2:]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least {2 * SSIM_RADIUS + 1} px, got {tuple(a.shape[-2:])}")
    x, y = a.double(), b.double()
    n, c = x.shape[:2]
    taps = _gaussian_taps(x.device)
    maps = torch.stack([x, y, x * x, y * y, x * y], 1).flatten(1, 2)  # (B, 5C, H, W)
    maps = _filter_valid(_filter_valid(maps, taps, -1), taps, -2)
    ux, uy, uxx, uyy, uxy = maps.view(n, 5, c, *maps.shape[-2:]).unbind(1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def ssim_skimage(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (B,) float64 of uint8 (B, 3, H, W) batches, computed on the CPU with scikit-image."""
    _check_pair(a, b)
    x = a.permute(0, 2, 3, 1).cpu().numpy()
    y = b.permute(0, 2, 3, 1).cpu().numpy()
    out = [structural_similarity(xi, yi, channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False) for xi, yi in zip(x, y)]
    return torch.tensor(out, dtype=torch.float64)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounded to nearest (values outside [-1, 1] are clipped)."""
    return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


class CodebookCounter:
    """Histogram of code indices over a set; adds across ranks."""

    def __init__(self, num_codes: int, device: str | torch.device = "cpu"):
        self.counts = torch.zeros(num_codes, dtype=torch.int64, device=device)

    def update(self, indices: torch.Tensor) -> None:
        idx = indices.reshape(-1).to(self.counts.device, torch.int64)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.counts.numel()):
            raise ValueError(f"code index out of range [0, {self.counts.numel()}): "
                             f"{int(idx.min())}..{int(idx.max())}")
        self.counts += torch.bincount(idx, minlength=self.counts.numel())

    def all_reduce(self) -> CodebookCounter:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts)
        return self

    def summary(self) -> dict[str, float | int]:
        """usage (fraction of codes used), codes_used, perplexity (exp of the histogram's entropy)."""
        counts = self.counts.double().cpu().numpy()
        total = counts.sum()
        if total == 0:
            return {"codebook_size": int(counts.size), "codes_used": 0, "usage": 0.0, "perplexity": float("nan")}
        p = counts[counts > 0] / total
        return {"codebook_size": int(counts.size), "codes_used": int((counts > 0).sum()),
                "usage": float((counts > 0).mean()), "perplexity": float(math.exp(-(p * np.log(p)).sum()))}
