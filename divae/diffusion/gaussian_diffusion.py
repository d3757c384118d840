"""Gaussian diffusion (DDPM / Improved DDPM): schedules, forward process, posterior, losses, one-step samplers.

Notation: T steps, beta_t the noise schedule, alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s,
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, SNR_t = abar_t / (1 - abar_t). Timesteps are 0-based: t in [0, T).
Tensors are images (B, C, H, W) in [-1, 1]; schedules are kept in float64 numpy and gathered per sample.

Parameterizations (what the model predicts) and what their plain MSE weighs, written as a weight on the squared
error of the implied x_0 estimate: epsilon -> SNR_t (so an x_0 error at t = 950 on the linear schedule costs
1e-4 of one at t = 0: colours are learned last), x0 -> 1, v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans &
Ho 2022) -> SNR_t + 1. `loss_weighting` rescales the MSE per sample to another x_0-space weight whatever the
parameterization: "min_snr" -> min(SNR_t, gamma) (Hang et al. 2023), "truncated_snr" -> max(SNR_t, 1) (Salimans &
Ho 2022). A zero-terminal-SNR schedule (abar_{T-1} = 0, Lin et al. 2023) needs x0 or v: epsilon cannot give x_0
from pure noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

# Modes are Literal types (the convention of every config dataclass: the config loader checks them at load
# time); the tuples, for checks at run time, are derived from them.
MeanType = Literal["epsilon", "x0", "v"]
VarType = Literal["learned_range", "fixed_small", "fixed_large"]
LossType = Literal["hybrid", "simple", "kl"]
Schedule = Literal["linear", "cosine"]
LossWeighting = Literal["none", "min_snr", "truncated_snr"]
MEAN_TYPES, VAR_TYPES, LOSS_TYPES, SCHEDULES, LOSS_WEIGHTINGS = (
    get_args(t) for t in (MeanType, VarType, LossType, Schedule, LossWeighting))


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """Betas (T,) float64. "linear": 1e-4..0.02 scaled by 1000/T (DDPM); "cosine": Improved DDPM, s=0.008."""
    if num_steps < 1:
        raise ValueError(f"diffusion steps must be >= 1, got {num_steps}")
    if name == "linear":
        scale = 1000 / num_steps
        return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(
            num_steps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2, max_beta=0.999
        )
    raise ValueError(f"unknown noise_schedule {name!r}; choose one of {SCHEDULES}")


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999):
    """Discretize a continuous abar(s), s in [0, 1], into T betas, each capped at max_beta."""
    betas = []
    for i in range(num_steps):
        s1, s2 = i / num_steps, (i + 1) / num_steps
        betas.append(min(1 - alpha_bar(s2) / alpha_bar(s1), max_beta))
    return np.array(betas, dtype=np.float64)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas (T,) whose abar_{T-1} is exactly 0 (Lin et al. 2023, Algorithm 1): sqrt(abar_t) is shifted so its
    last value is 0 and scaled so its first is unchanged; the last beta becomes 1."""
    sqrt_abar = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = np.append(abar[0], abar[1:] / abar[:-1])
    return 1.0 - alphas


def _extract(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[t] as a tensor broadcastable to `like` (B, 1, 1, ...). float64 only if `like` is float64."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    out = torch.from_numpy(arr).to(device=t.device)[t].to(dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1)))


class GaussianDiffusion:
    """Diffusion utilities for a given beta schedule.

    model_mean_type: what the model predicts, "epsilon" (the noise), "x0" or "v" (see the module docstring).
    model_var_type: "learned_range" (the model outputs 2C channels; the extra C are v, nominally in [-1, 1]
        and not clamped, and log Sigma = frac log beta_t + (1 - frac) log beta~_t with frac = (v + 1) / 2),
        "fixed_small"
        (beta~_t, the posterior variance) or "fixed_large" (beta_t).
    loss_type: "simple" (MSE on the prediction), "kl" (the variational bound alone, T * L_t in bits/dim),
        "hybrid" (MSE + vlb_weight * T * L_t with the mean detached in the vlb term: Improved DDPM).
    loss_weighting: per-sample factor on the MSE term, "none" | "min_snr" | "truncated_snr" (module docstring);
        min_snr_gamma is its gamma.
    """

    def __init__(
        self,
        *,
        betas: np.ndarray,
        model_mean_type: MeanType = "epsilon",
        model_var_type: VarType = "learned_range",
        loss_type: LossType = "hybrid",
        vlb_weight: float = 0.001,
        loss_weighting: LossWeighting = "none",
        min_snr_gamma: float = 5.0,
    ):
        if model_mean_type not in MEAN_TYPES:
            raise ValueError(f"model_mean_type {model_mean_type!r} not in {MEAN_TYPES}")
        if model_var_type not in VAR_TYPES:
            raise ValueError(f"model_var_type {model_var_type!r} not in {VAR_TYPES}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss {loss_type!r} not in {LOSS_TYPES}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting {loss_weighting!r} not in {LOSS_WEIGHTINGS}")
        if loss_type == "hybrid" and model_var_type != "learned_range":
            raise ValueError("loss='hybrid' trains the variance: it needs model_var_type='learned_range'")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.vlb_weight = vlb_weight
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        if len(betas) < 1:
            raise ValueError("a diffusion needs at least 1 timestep (2 to train: DiffusionConfig checks)")
        self.betas = betas
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        if model_mean_type == "epsilon" and self.alphas_cumprod[-1] == 0:
            raise ValueError("a zero-terminal-SNR schedule (abar_{T-1} = 0) needs model_mean_type 'v' or 'x0': an "
                             "epsilon model cannot give x_0 from pure noise")
        with np.errstate(divide="ignore"):  # abar_{T-1} = 0 (zero terminal SNR): these are inf there, never used
            self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
            self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0: clip the log at t = 0 to beta~_1 (the value Improved DDPM uses; beta_0 for a one-step
        # sampling diffusion, where t = 0 adds no noise anyway).
        self.first_variance = self.posterior_variance[1] if len(betas) > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(
            np.append(self.first_variance, self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (
            1.0 - self.alphas_cumprod
        )

    # ---- forward process -------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0): (B, C, H, W)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            _extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = _extract(self.posterior_mean_coef1, t, xt) * x0 + _extract(self.posterior_mean_coef2, t, xt) * xt
        var = _extract(self.posterior_variance, t, xt)
        log_var = _extract(self.posterior_log_variance_clipped, t, xt)
        return mean, var, log_var

    def predict_x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return _extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt - _extract(
            self.sqrt_recipm1_alphas_cumprod, t, xt
        ) * eps

    def predict_eps_from_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t): finite at abar_t = 0 (zero terminal SNR)."""
        return (xt - _extract(self.sqrt_alphas_cumprod, t, xt) * x0) / _extract(
            self.sqrt_one_minus_alphas_cumprod, t, xt
        )

    def predict_x0_from_v(self, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
        return _extract(self.sqrt_alphas_cumprod, t, xt) * xt - _extract(self.sqrt_one_minus_alphas_cumprod, t, xt) * v

    def x0_from_prediction(self, pred: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x_0 estimate (B, C, H, W) implied by the model's mean channels `pred` under model_mean_type."""
        if self.model_mean_type == "epsilon":
            return self.predict_x0_from_eps(xt, t, pred)
        if self.model_mean_type == "v":
            return self.predict_x0_from_v(xt, t, pred)
        return pred

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, the v-prediction target (B, C, H, W)."""
        return _extract(self.sqrt_alphas_cumprod, t, x0) * noise - _extract(self.sqrt_one_minus_alphas_cumprod, t,
                                                                            x0) * x0

    def mse_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample factor (B,) float32 on the parameterization's MSE that makes its x_0-space weight the one
        `loss_weighting` names (ones for "none"). SNR_t = 0 (zero terminal SNR) gives the limit values."""
        if self.loss_weighting == "none":
            return torch.ones(t.shape, device=t.device)
        snr = torch.from_numpy(self.snr).to(t.device)[t]
        if self.loss_weighting == "min_snr":
            target = snr.clamp(max=self.min_snr_gamma)
        else:
            target = snr.clamp(min=1.0)
        own = {"epsilon": snr, "x0": torch.ones_like(snr), "v": snr + 1}[self.model_mean_type]
        # epsilon at SNR 0 (only reachable with x0/v, see __init__) would be 0/0; the limit is 1
        return torch.where(own > 0, target / own.clamp(min=1e-300), torch.ones_like(snr)).float()

    # ---- reverse process -------------------------------------------------------------------------
    @staticmethod
    def variance_frac(v: torch.Tensor) -> torch.Tensor:
        """Interpolation weight (v + 1) / 2 of log beta_t against log beta~_t, with v left unclamped.

        As in improved-diffusion: where the vlb optimum lies outside [beta~_t, beta_t], v settles a little
        outside [-1, 1] and its gradient vanishes there. A straight-through clamp (forward clamped, gradient
        passed) was the former rule: outside the range its gradient never vanishes, so v drifts without bound
        (to 667 in 300 steps on a fixed problem that the unclamped rule solves at v = 3.03; bench/RESULTS.md).
        """
        return (v + 1) / 2

    def wrap_model(self, model: Callable) -> Callable:
        """Hook for subclasses that remap timesteps (respacing); identity here."""
        return model

    def p_from_output(
        self,
        output: torch.Tensor,
        xt: torch.Tensor,
        t: torch.Tensor,
        *,
        clip_denoised: bool = False,
        detach_mean: bool = False,
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from a raw model output (B, C or 2C, H, W).

        Returns dict with "mean", "variance", "log_variance", "pred_x0", "eps" (all (B, C, H, W)).
        detach_mean: stop gradients through the mean (the hybrid loss's vlb term trains only the variance).
        """
        output = output.float() if xt.dtype != torch.float64 else output.double()
        c = xt.shape[1]
        if self.model_var_type == "learned_range":
            if output.shape[1] != 2 * c:
                raise ValueError(
                    f"learned_range variance needs a model with {2 * c} output channels, got "
                    f"{output.shape[1]}: set UNetConfig.learn_sigma=True"
                )
            pred, v = output[:, :c], output[:, c:]
            min_log = _extract(self.posterior_log_variance_clipped, t, xt)
            max_log = _extract(np.log(self.betas), t, xt)
            frac = self.variance_frac(v)
            log_var = frac * max_log + (1 - frac) * min_log
            var = torch.exp(log_var)
        else:
            if output.shape[1] != c:
                raise ValueError(f"fixed variance needs {c} output channels, got {output.shape[1]}")
            pred = output
            if self.model_var_type == "fixed_large":
                # beta~_1 at t = 0 for a finite log-likelihood, betas elsewhere (Improved DDPM).
                var_arr = np.append(self.first_variance, self.betas[1:])
            else:
                var_arr = self.posterior_variance
            log_arr = np.log(np.append(self.first_variance, var_arr[1:]))
            var = _extract(var_arr, t, xt).expand_as(xt)
            log_var = _extract(log_arr, t, xt).expand_as(xt)
        if detach_mean:
            pred = pred.detach()
        pred_x0 = self.x0_from_prediction(pred, xt, t)
        eps = pred if self.model_mean_type == "epsilon" else None
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        if eps is None or clip_denoised:
            eps = self.predict_eps_from_x0(xt, t, pred_x0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, xt, t)
        return {"mean": mean, "variance": var, "log_variance": log_var, "pred_x0": pred_x0, "eps": eps}

    def p_mean_variance(
        self, model: Callable, xt: torch.Tensor, t: torch.Tensor, *, clip_denoised: bool = False,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the model at (x_t, t) and return p(x_{t-1} | x_t) as in `p_from_output`."""
        output = self.wrap_model(model)(xt, t, **(model_kwargs or {}))
        return self.p_from_output(output, xt, t, clip_denoised=clip_denoised)

    def p_sample(self, model, xt, t, noise, *, clip_denoised=False, model_kwargs=None):
        """One ancestral DDPM step x_t -> x_{t-1}. noise: (B, C, H, W), unused where t == 0."""
        out = self.p_mean_variance(model, xt, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        nonzero = (t != 0).to(xt.dtype).reshape(-1, *([1] * (xt.dim() - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return sample, out["pred_x0"]

    def ddim_sample(self, model, xt, t, noise, *, eta=0.0, clip_denoised=False, model_kwargs=None):
        """One DDIM step x_t -> x_{t-1} (eta = 0 deterministic, eta = 1 DDPM-like fixed_small variance)."""
        out = self.p_mean_variance(model, xt, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        eps = out["eps"]
        abar = _extract(self.alphas_cumprod, t, xt)
        abar_prev = _extract(self.alphas_cumprod_prev, t, xt)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = out["pred_x0"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        nonzero = (t != 0).to(xt.dtype).reshape(-1, *([1] * (xt.dim() - 1)))
        return mean + nonzero * sigma * noise, out["pred_x0"]

    # ---- losses ------------------------------------------------------------------------------------
    def vb_terms_bpd(
        self, out: dict[str, torch.Tensor], x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The vlb term L_t in bits per dimension, (B,): KL(q(x_{t-1}|x_t,x_0) || p) for t > 0 and the
        discretized Gaussian negative log-likelihood of x_0 for t = 0. `out` is `p_from_output`'s dict."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(
            x0, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model: Callable,
        x0: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses for one timestep per image.

        x0: (B, C, H, W) in [-1, 1]; t: (B,) long in [0, num_timesteps); model_kwargs go to the model
        (e.g. {"cond": z_q}); noise: optional eps (B, C, H, W).
        Returns {"loss", "mse", "vb"}, each (B,) float32: mse is the mean squared error of the prediction
        (unweighted), vb the vlb term L_t in bits/dim (computed with the mean detached unless loss == "kl"), loss
        the objective of `loss_type` with the MSE term scaled by `mse_weights(t)`; and "pred_x0" (B, C, H, W)
        float32, the model's x_0 estimate (not clamped, with its gradient: for perceptual terms on it). Weight
        by a schedule sampler's importance weights before averaging.
        """
        if t.shape != (x0.shape[0],):
            raise ValueError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise=noise)
        output = self.wrap_model(model)(xt, t, **(model_kwargs or {}))
        if output.shape[0] != x0.shape[0] or output.shape[2:] != x0.shape[2:]:
            raise ValueError(f"model output {tuple(output.shape)} does not match input {tuple(x0.shape)}")
        c = x0.shape[1]
        pred = output[:, :c].float()
        target = {"epsilon": noise, "x0": x0}.get(self.model_mean_type)
        if target is None:
            target = self.v_target(x0, t, noise)
        mse = mean_flat((target.float() - pred) ** 2)
        pred_x0 = self.x0_from_prediction(pred, xt.float(), t)
        if self.loss_type == "kl":
            out = self.p_from_output(output, xt, t)
            vb = self.vb_terms_bpd(out, x0, xt, t)
            return {"loss": vb * self.num_timesteps, "mse": mse, "vb": vb, "pred_x0": pred_x0}
        out = self.p_from_output(output, xt, t, detach_mean=True)
        vb = self.vb_terms_bpd(out, x0, xt, t)
        weighted = self.mse_weights(t) * mse
        if self.loss_type == "hybrid":
            # lambda * L_vlb, with L_vlb ~ T * L_t for uniformly drawn t (lambda = 0.001, T = 1000 -> L_t).
            loss = weighted + self.vlb_weight * self.num_timesteps * vb
        else:
            loss = weighted
            vb = vb.detach()
        return {"loss": loss, "mse": mse, "vb": vb, "pred_x0": pred_x0}
