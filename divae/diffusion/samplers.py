"""Sampling loops: DDPM ancestral, DDIM (with eta) and DPM-Solver++(2M).

Each loop runs over every step of the (usually respaced) diffusion it is given, from pure noise to x_0.
Noise is drawn per sample, in a fixed order (x_T is draw 0, then one draw per stochastic step):
- with `seeds` (the default of `divae.diffusion.sample(seeds=...)`), element j of image i's draw k is a
  counter-based function of (seeds[i], k, j) computed with integer tensor ops on the sampling device
  (`counter_normal`): nothing is copied from the host per step, and the noise does not depend on the
  batch mates, the batch size, the number of ranks or the device type (integer hashing is exact
  everywhere; the final inverse normal CDF runs in float64 and is rounded to float32);
- with `generators`, image i's noise comes only from generators[i] (torch's own RNG, on the generator's
  device, copied to the sampling device).
Each loop starts from `x_T` when one is given (then no draw is spent on it). Use `divae.diffusion.sample`
rather than calling these directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch

from .gaussian_diffusion import GaussianDiffusion

SamplerName = Literal["ddpm", "ddim", "dpmpp2m"]
SAMPLERS = get_args(SamplerName)


def generators_from_seeds(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per seed (CPU so the same seed gives the same noise on every device)."""
    gens = []
    for s in seeds:
        g = torch.Generator(device="cpu")
        g.manual_seed(int(s))
        gens.append(g)
    return gens


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The `lowbias32` integer hash (C. Wellons), a bijection of the 32-bit words, on int64 (values in
    [0, 2^32)) or int32 (the same bits, two's complement) tensors. Shifts are made logical with masks and
    multiplications wrap on every torch backend, so the bits are identical on CPU and GPU."""
    if x.dtype == torch.int32:  # the fast path of the per-element noise (3x the int64 speed on CPU)
        x = x ^ ((x >> 16) & 0xFFFF)
        x = x * 0x7FEB352D
        x = x ^ ((x >> 15) & 0x1FFFF)
        x = x * (0x846CA68B - (1 << 32))
        return x ^ ((x >> 16) & 0xFFFF)
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same 32 bits."""
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def _stream_keys(seeds: torch.Tensor, draw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys (B, 1) int32 per (seed, draw) from int64 seeds (B,) (any value, negative included)."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    k = _mix32(lo ^ _mix32(hi ^ 0x9E3779B9))
    k = _mix32(k ^ _mix32(torch.full_like(k, (draw * 0x85EBCA6B + 0x27D4EB2F) & _MASK32)))
    return _as_int32(k)[:, None], _as_int32(_mix32(k ^ 0x5BD1E995))[:, None]


def counter_normal(seeds: torch.Tensor, draw: int, numel: int, counters: torch.Tensor | None = None) -> torch.Tensor:
    """Standard normal noise (B, numel) float32 that depends only on (seeds[b], draw, element index).

    seeds: int64 (B,) on the target device. Each element's 32 bits are two keyed rounds of `_mix32` over its
    index (int32 arithmetic); the top 24 bits give u in (0, 1) (exact), and z = ndtri(u) in float64, rounded
    to float32 (|z| <= 5.3). `counters`: arange(numel) int32 on the device, to reuse across draws."""
    if numel >= 1 << 31:
        raise ValueError(f"counter noise covers fewer than 2^31 elements per image, got {numel}")
    if counters is None:
        counters = torch.arange(numel, dtype=torch.int32, device=seeds.device)
    k1, k2 = _stream_keys(seeds.to(torch.int64), draw)
    bits = _mix32(_mix32(counters[None] + k1) ^ k2)
    u = (((bits >> 8) & 0xFFFFFF).to(torch.float64) + 0.5) * 2.0**-24
    return torch.special.ndtri(u).to(torch.float32)


class NoiseSource:
    """Draws (B, C, H, W) standard normal noise per sample: from `seeds` (counter-based, on `device`), from
    one generator per sample, or (neither) from the global RNG. Draw k of image i depends only on its seed
    (or generator) and k."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, generators: Sequence | None = None,
                 seeds: Sequence[int] | torch.Tensor | None = None):
        if generators is not None and seeds is not None:
            raise ValueError("pass generators or seeds, not both")
        per_image = generators if generators is not None else seeds
        if per_image is not None and len(per_image) != shape[0]:
            raise ValueError(f"got {len(per_image)} generators/seeds for a batch of {shape[0]}: pass one per image")
        self.shape, self.device, self.generators = tuple(shape), device, generators
        self.seeds = None if seeds is None else torch.as_tensor(list(seeds) if not torch.is_tensor(seeds) else seeds,
                                                                dtype=torch.int64).to(device)
        self.draws = 0
        self._counters: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        draw, self.draws = self.draws, self.draws + 1
        if self.seeds is not None:
            numel = math.prod(self.shape[1:])
            if self._counters is None:
                self._counters = torch.arange(numel, dtype=torch.int32, device=self.device)
            return counter_normal(self.seeds, draw, numel, self._counters).view(self.shape)
        if self.generators is None:
            return torch.randn(self.shape, device=self.device)
        return torch.stack(
            [torch.randn(self.shape[1:], generator=g, device=g.device) for g in self.generators]
        ).to(self.device)


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc)


def _t(i: int, n: int, device) -> torch.Tensor:
    return torch.full((n,), i, device=device, dtype=torch.long)


@torch.no_grad()
def ddpm_loop(
    diffusion: GaussianDiffusion, model: Callable, noise: NoiseSource, *, clip_denoised: bool = True,
    model_kwargs: dict | None = None, progress: bool = False, x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ancestral sampling x_T -> x_0 with the model's variance; one model call per step."""
    model = diffusion.wrap_model(model)
    x = noise() if x_T is None else x_T
    for i in _progress(reversed(range(diffusion.num_timesteps)), progress, "ddpm"):
        t = _t(i, x.shape[0], x.device)
        z = noise() if i > 0 else torch.zeros_like(x)
        x, _ = diffusion.p_sample(model, x, t, z, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
    return x


@torch.no_grad()
def ddim_loop(
    diffusion: GaussianDiffusion, model: Callable, noise: NoiseSource, *, eta: float = 0.0,
    clip_denoised: bool = True, model_kwargs: dict | None = None, progress: bool = False,
    x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM x_T -> x_0; eta = 0 is the deterministic ODE-like sampler. One model call per step."""
    model = diffusion.wrap_model(model)
    x = noise() if x_T is None else x_T
    for i in _progress(reversed(range(diffusion.num_timesteps)), progress, "ddim"):
        t = _t(i, x.shape[0], x.device)
        z = noise() if (eta > 0 and i > 0) else torch.zeros_like(x)
        x, _ = diffusion.ddim_sample(
            model, x, t, z, eta=eta, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )
    return x


@torch.no_grad()
def dpmpp2m_loop(
    diffusion: GaussianDiffusion, model: Callable, noise: NoiseSource, *, clip_denoised: bool = True,
    model_kwargs: dict | None = None, progress: bool = False, x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in the data-prediction form.

    With alpha_i = sqrt(abar_i), sigma_i = sqrt(1 - abar_i), lambda_i = log(alpha_i / sigma_i),
    h = lambda_{i+1} - lambda_i and D_i the x_0 prediction at step i:
        x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (exp(-h) - 1) D'
    with D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1} / h, except at the first step and the last
    solver step, which are first order (D' = D_i; "lower order final" keeps the large last lambda step
    stable). The final call returns D at the smallest kept timestep (sigma -> 0). A learned-variance
    model is fine: only its epsilon (mean) channels are used. One model call per kept step.
    """
    model = diffusion.wrap_model(model)
    x = noise() if x_T is None else x_T
    abar = torch.from_numpy(diffusion.alphas_cumprod)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = torch.log(alpha) - torch.log(sigma)
    steps = list(reversed(range(diffusion.num_timesteps)))
    d_prev, h_prev = None, None
    for k, i in enumerate(_progress(steps, progress, "dpm++2m")):
        t = _t(i, x.shape[0], x.device)
        output = model(x, t, **(model_kwargs or {}))
        d = diffusion.p_from_output(output, x, t, clip_denoised=clip_denoised)["pred_x0"]
        if k == len(steps) - 1:
            x = d
            break
        j = steps[k + 1]
        h = float(lam[j] - lam[i])
        if d_prev is None or k == len(steps) - 2:
            d_used = d
        else:
            r = h_prev / h
            d_used = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev
        x = float(sigma[j] / sigma[i]) * x - float(alpha[j]) * math.expm1(-h) * d_used  # float64 coefficients
        d_prev, h_prev = d, h
    return x

