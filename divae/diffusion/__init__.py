"""Gaussian diffusion for the DiVAE decoder: config, factory, one sampling entry point, loss logging.

    cfg = DiffusionConfig()                      # T = 1000, linear, epsilon, learned range, hybrid loss
    diffusion = create_diffusion(cfg)            # for training
    losses = diffusion.training_losses(unet, x0, t, model_kwargs={"cond": z_q})
    x = sample(unet, cfg, (B, 3, 256, 256), sampler="dpmpp2m", steps=20,
               model_kwargs={"cond": z_q}, seeds=range(B))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .gaussian_diffusion import (
    LOSS_TYPES,
    LOSS_WEIGHTINGS,
    MEAN_TYPES,
    SCHEDULES,
    VAR_TYPES,
    GaussianDiffusion,
    LossType,
    LossWeighting,
    MeanType,
    Schedule,
    VarType,
    get_named_beta_schedule,
    rescale_zero_terminal_snr,
)
from .resample import LossSecondMomentResampler, UniformSampler, create_schedule_sampler
from .respace import SpacedDiffusion, space_timesteps
from .samplers import SAMPLERS, NoiseSource, ddim_loop, ddpm_loop, dpmpp2m_loop, generators_from_seeds

# Step counts used when `sample(..., steps=None)`: the paper's 1000-step DDPM, DDIM 25 (its appendix),
# and 20 steps for the second-order solver.
DEFAULT_STEPS = {"ddpm": None, "ddim": 25, "dpmpp2m": 20}


@dataclass
class DiffusionConfig:
    """The diffusion process of the decoder (Improved DDPM defaults, as in the paper).

    timesteps: T, the number of timesteps of the forward (noising) process the model is trained on; the
        samplers' `steps` (network evaluations) pick a subset of these. Was `steps` (renamed: RENAMED_KEYS).
    noise_schedule: "linear" | "cosine".
    zero_terminal_snr: rescale the schedule so abar_{T-1} = 0 (Lin et al. 2023; needs model_mean_type v or x0).
    model_mean_type: "epsilon" | "x0" | "v" (what the UNet predicts; gaussian_diffusion's docstring compares them).
    model_var_type: "learned_range" (UNet must have learn_sigma=True) | "fixed_small" | "fixed_large".
    loss: "hybrid" (L_simple + vlb_weight * L_vlb, mean detached in L_vlb) | "simple" | "kl".
    loss_weighting: the MSE term's per-timestep weight, "none" (the parameterization's own) | "min_snr"
        (min(SNR, min_snr_gamma) on the x_0 error, Hang et al. 2023) | "truncated_snr" (max(SNR, 1)).
    schedule_sampler: how training draws t, "uniform" | "loss-second-moment" (importance sampling).
    clip_denoised: clamp x_0 predictions to [-1, 1] while sampling.
    """

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"steps": "timesteps"}  # old key -> new, for configs and model files

    timesteps: int = 1000
    noise_schedule: Schedule = "linear"
    zero_terminal_snr: bool = False
    model_mean_type: MeanType = "epsilon"
    model_var_type: VarType = "learned_range"
    loss: LossType = "hybrid"
    vlb_weight: float = 0.001
    loss_weighting: LossWeighting = "none"
    min_snr_gamma: float = 5.0
    schedule_sampler: Literal["uniform", "loss-second-moment"] = "uniform"
    clip_denoised: bool = True

    def __post_init__(self):
        checks = {"noise_schedule": SCHEDULES, "model_mean_type": MEAN_TYPES, "model_var_type": VAR_TYPES,
                  "loss": LOSS_TYPES, "loss_weighting": LOSS_WEIGHTINGS}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"diffusion.{name}={getattr(self, name)!r}: choose one of {allowed}")
        if self.timesteps < 2:
            raise ValueError(f"diffusion.timesteps={self.timesteps}: need at least 2")
        if self.zero_terminal_snr and self.model_mean_type == "epsilon":
            raise ValueError("diffusion.zero_terminal_snr=true needs diffusion.model_mean_type v (or x0): an epsilon "
                             "model cannot give x_0 from pure noise at the last timestep")
        if not self.min_snr_gamma > 0:
            raise ValueError(f"diffusion.min_snr_gamma={self.min_snr_gamma}: must be > 0")
        if self.loss == "hybrid" and self.model_var_type != "learned_range":
            raise ValueError("diffusion.loss='hybrid' trains the variance: it needs model_var_type='learned_range' "
                             "(or use loss='simple' with a fixed variance)")

    @property
    def learn_sigma(self) -> bool:
        """True when the model must output 2C channels."""
        return self.model_var_type == "learned_range"


def create_diffusion(cfg: DiffusionConfig, timestep_respacing: str | Sequence[int] = "") -> SpacedDiffusion:
    """A diffusion over all `cfg.timesteps` steps ("") or a respaced subset ("250", "ddim25", "10,15,20", or
    an explicit list of timesteps). Timestep indices into the result run 0..K-1."""
    betas = get_named_beta_schedule(cfg.noise_schedule, cfg.timesteps)
    if cfg.zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    if isinstance(timestep_respacing, str):
        use = space_timesteps(cfg.timesteps, timestep_respacing) if timestep_respacing else range(cfg.timesteps)
    else:
        use = timestep_respacing
    return SpacedDiffusion(
        use,
        betas=betas,
        model_mean_type=cfg.model_mean_type,
        model_var_type=cfg.model_var_type,
        loss_type=cfg.loss,
        vlb_weight=cfg.vlb_weight,
        loss_weighting=cfg.loss_weighting,
        min_snr_gamma=cfg.min_snr_gamma,
    )


def sample(
    model: Callable,
    diffusion_cfg: DiffusionConfig,
    shape: Sequence[int],
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    model_kwargs: dict | None = None,
    generators: Sequence[torch.Generator] | None = None,
    seeds: Sequence[int] | None = None,
    clip_denoised: bool | None = None,
    timestep_respacing: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate x_0 of `shape` (B, C, H, W) with a trained model; the single sampling entry point.

    model: `model(x_t, t, **model_kwargs)` with t the original (training) timesteps, e.g. a UNetModel;
        an nn.Module is put in eval mode for the call and restored after.
    diffusion_cfg: the config the model was trained with (schedule, mean/variance parametrisation).
    sampler: "ddpm" (ancestral, learned or fixed variance; the paper's headline with 1000 steps),
        "ddim" (eta = 0 deterministic, eta > 0 adds noise), "dpmpp2m" (DPM-Solver++(2M), deterministic,
        second order, good at 10-25 steps).
    steps: model evaluations; None means 1000 (all T) for ddpm, 25 for ddim, 20 for dpmpp2m. The kept
        timesteps: "quad{steps}" for dpmpp2m (dense near t = 0), "ddim{steps}" for ddim (DDIM's even
        stride from 0), `steps` evenly spaced ones including 0 and T-1 for ddpm; `timestep_respacing`
        (e.g. "ddim25", "quad20", "10,15,20", see respace.space_timesteps) overrides this.
    model_kwargs: extra model inputs, e.g. {"cond": z_q (B, d, h, w)}.
    generators / seeds: per-image randomness (give at most one): image i's noise comes only from seeds[i]
        (counter-based noise drawn on `device`, identical whatever the batch size, number of ranks or
        device type; see samplers.counter_normal) or from generators[i]. Neither: the global torch RNG.
    clip_denoised: clamp x_0 predictions to [-1, 1]; None takes diffusion_cfg.clip_denoised.
    device: where to sample; None takes the model's device (CPU for a plain function).
    x_T: the starting noise (B, C, H, W) instead of the first draw (e.g. to compare samplers on one start).
    Returns x_0 (B, C, H, W) float32, in [-1, 1] up to the model's accuracy (not clamped).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if generators is not None and seeds is not None:
        raise ValueError("pass generators or seeds, not both")
    respacing = _respacing_for(diffusion_cfg, sampler, steps, timestep_respacing)
    diffusion = create_diffusion(diffusion_cfg, respacing)
    device = _model_device(model) if device is None else torch.device(device)
    noise = NoiseSource(tuple(shape), device, generators, None if seeds is None else list(seeds))
    clip = diffusion_cfg.clip_denoised if clip_denoised is None else clip_denoised
    if x_T is not None and tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
    common = dict(clip_denoised=clip, model_kwargs=model_kwargs, progress=progress, x_T=x_T)
    return _run_in_eval_mode(model, lambda: _run_loop(sampler, diffusion, model, noise, eta, common))


def _respacing_for(diffusion_cfg: DiffusionConfig, sampler: str, steps: int | None,
                   timestep_respacing: str | None) -> str | list[int]:
    """The timesteps `sample` keeps: `timestep_respacing` as given, or the sampler's default spacing of `steps`
    model evaluations (None: DEFAULT_STEPS[sampler]; all T, "", when that is T or None)."""
    if timestep_respacing is not None:
        if steps is not None:
            raise ValueError("pass steps or timestep_respacing, not both")
        return timestep_respacing
    n = steps if steps is not None else DEFAULT_STEPS[sampler]
    total = diffusion_cfg.timesteps
    if n is None or n == total:
        return ""
    if not 1 <= n <= total:
        raise ValueError(f"steps must be in [1, {total}], got {n}")
    return _default_respacing(sampler, n, total)


def _model_device(model: Callable) -> torch.device:
    """Where `model` runs: its first parameter's device; CPU for a plain function or a module without any."""
    params = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    return params.device if params is not None else torch.device("cpu")


def _run_loop(sampler: str, diffusion: SpacedDiffusion, model: Callable, noise: NoiseSource, eta: float,
              common: dict) -> torch.Tensor:
    """x_0 (B, C, H, W) from the named sampler's loop; `common`: the keyword arguments every loop takes."""
    if sampler == "ddpm":
        return ddpm_loop(diffusion, model, noise, **common)
    if sampler == "ddim":
        return ddim_loop(diffusion, model, noise, eta=eta, **common)
    return dpmpp2m_loop(diffusion, model, noise, **common)


def _run_in_eval_mode(model: Callable, run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`run()` with an nn.Module `model` in eval mode (dropout off while sampling), its training mode restored
    after, also when `run` raises."""
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        return run()
    finally:
        if was_training:
            model.train()


def _default_respacing(sampler: str, n: int, total: int) -> str | list[int]:
    """dpmpp2m: quadratic in time (dense near t = 0, far more accurate than even spacing at 10-25 steps);
    ddim: the DDIM paper's even stride from t = 0 (the paper's DDIM25) when one gives n steps; else n
    evenly spaced steps including 0 and T - 1. One step is T - 1 alone: one network evaluation on pure noise
    that returns its x_0 estimate (evenly spaced rounding would keep t = 0 and feed it noise)."""
    if n == 1:
        return [total - 1]
    if sampler == "dpmpp2m" and n >= 2:
        return f"quad{n}"
    if sampler == "ddim" and any(len(range(0, total, s)) == n for s in range(1, total)):
        return f"ddim{n}"
    return str(n)


__all__ = [
    "DEFAULT_STEPS",
    "SAMPLERS",
    "DiffusionConfig",
    "GaussianDiffusion",
    "LossSecondMomentResampler",
    "SpacedDiffusion",
    "UniformSampler",
    "create_diffusion",
    "create_schedule_sampler",
    "generators_from_seeds",
    "get_named_beta_schedule",
    "rescale_zero_terminal_snr",
    "sample",
    "space_timesteps",
]
