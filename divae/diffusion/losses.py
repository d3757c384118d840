"""Gaussian KL and the discretized Gaussian log-likelihood used by the variational bound.

All functions work elementwise and broadcast; they return natural-log units (nats). Callers divide by
log(2) for bits.
"""

from __future__ import annotations

import math

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all dimensions but the batch: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast tanh approximation of the standard normal CDF (as in Improved DDPM); error below 3e-4."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-probability of 8-bit images under a Gaussian discretized into 256 bins.

    x: image values on the grid 2k/255 - 1, k = 0..255 (so in [-1, 1]). means, log_scales: broadcastable
    to x; log_scales is the log standard deviation. The bins are [x - 1/255, x + 1/255]; the two edge
    bins extend to -inf and +inf, so the 256 probabilities of a pixel sum to 1.
    Returns log-likelihoods in nats, shape of x.
    """
    if x.shape != means.shape:
        means = means.expand_as(x)
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))),
    )
    return log_probs
