"""Sampling loops: DDPM ancestral, DDIM (with eta) and DPM-Solver++(2M).

Each loop runs over every step of the (usually respaced) diffusion it is given, from pure noise to x_0.
Noise is drawn per sample: with `generators`, image i's noise comes only from generators[i], in a fixed
order (x_T first, then one draw per stochastic step), so an image does not depend on its batch mates,
the batch size or the number of ranks. Use `divae.diffusion.sample` rather than calling these directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .gaussian_diffusion import GaussianDiffusion

SAMPLERS = ("ddpm", "ddim", "dpmpp2m")


def generators_from_seeds(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per seed (CPU so the same seed gives the same noise on every device)."""
    gens = []
    for s in seeds:
        g = torch.Generator(device="cpu")
        g.manual_seed(int(s))
        gens.append(g)
    return gens


class NoiseSource:
    """Draws (B, C, H, W) standard normal noise, one slice per sample from its own generator."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, generators: Sequence | None = None):
        if generators is not None and len(generators) != shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}: pass one per image")
        self.shape, self.device, self.generators = tuple(shape), device, generators

    def __call__(self) -> torch.Tensor:
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
    model_kwargs: dict | None = None, progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling x_T -> x_0 with the model's variance; one model call per step."""
    model = diffusion.wrap_model(model)
    x = noise()
    for i in _progress(reversed(range(diffusion.num_timesteps)), progress, "ddpm"):
        t = _t(i, x.shape[0], x.device)
        z = noise() if i > 0 else torch.zeros_like(x)
        x, _ = diffusion.p_sample(model, x, t, z, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
    return x


@torch.no_grad()
def ddim_loop(
    diffusion: GaussianDiffusion, model: Callable, noise: NoiseSource, *, eta: float = 0.0,
    clip_denoised: bool = True, model_kwargs: dict | None = None, progress: bool = False,
) -> torch.Tensor:
    """DDIM x_T -> x_0; eta = 0 is the deterministic ODE-like sampler. One model call per step."""
    model = diffusion.wrap_model(model)
    x = noise()
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
    model_kwargs: dict | None = None, progress: bool = False,
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
    x = noise()
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

