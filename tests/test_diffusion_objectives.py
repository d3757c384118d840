"""The decoder objectives beyond the paper's epsilon: v-prediction, loss weightings (min-SNR-gamma, truncated SNR)
and zero-terminal-SNR schedules, checked against diffusers' schedulers on identical inputs (float64, the schedule
tables made equal so only the update formulas are compared), and against a closed-form oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale
from diffusers.training_utils import compute_snr

from divae.diffusion import DiffusionConfig, create_diffusion, rescale_zero_terminal_snr, sample

MU, S = 0.3, 0.5
SHAPE = (64, 1, 16, 16)
DIFFUSERS_TYPE = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}
# every parameterization on the linear schedule, and those that allow it with zero terminal SNR
PARAM_SCHEDULES = [("epsilon", False), ("x0", False), ("v", False), ("x0", True), ("v", True)]


def _cfg(mean_type: str, ztsnr: bool = False, **kw) -> DiffusionConfig:
    return DiffusionConfig(model_mean_type=mean_type, model_var_type="fixed_small", loss="simple",
                           zero_terminal_snr=ztsnr, **kw)


def _with_our_tables(sched, diffusion):
    """Give a diffusers scheduler our float64 schedule, so a comparison checks formulas, not float32 cumprods."""
    sched.betas = torch.from_numpy(diffusion.betas)
    sched.alphas = 1 - sched.betas
    sched.alphas_cumprod = torch.from_numpy(diffusion.alphas_cumprod)
    return sched


def _inputs(seed: int = 0, shape=(2, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def test_zero_terminal_snr_schedule_equals_diffusers():
    diffusion = create_diffusion(_cfg("v", ztsnr=True))
    linear = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ref = diffusers_rescale(linear).numpy()
    np.testing.assert_allclose(rescale_zero_terminal_snr(linear.numpy()), ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(diffusion.betas, ref, rtol=1e-9, atol=1e-12)
    assert diffusion.alphas_cumprod[-1] == 0 and diffusion.betas[-1] == pytest.approx(1.0)
    plain = create_diffusion(_cfg("v"))
    assert diffusion.alphas_cumprod[0] == pytest.approx(plain.alphas_cumprod[0], rel=1e-12)
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        _cfg("epsilon", ztsnr=True)


@pytest.mark.parametrize("mean_type", ["v", "epsilon"])
def test_v_target_and_snr_equal_diffusers(mean_type):
    diffusion = create_diffusion(_cfg(mean_type))
    sched = _with_our_tables(DDPMScheduler(num_train_timesteps=1000, prediction_type=DIFFUSERS_TYPE[mean_type]),
                             diffusion)
    x0, noise = _inputs()
    t = torch.tensor([3, 777])
    torch.testing.assert_close(diffusion.v_target(x0, t, noise), sched.get_velocity(x0, noise, t), rtol=0, atol=1e-12)
    # diffusers returns float32
    torch.testing.assert_close(torch.from_numpy(diffusion.snr)[t].float(), compute_snr(sched, t), rtol=1e-6, atol=0)


@pytest.mark.parametrize("mean_type,ztsnr", PARAM_SCHEDULES)
def test_ddpm_step_equals_diffusers(mean_type, ztsnr):
    diffusion = create_diffusion(_cfg(mean_type, ztsnr))
    sched = _with_our_tables(DDPMScheduler(num_train_timesteps=1000, prediction_type=DIFFUSERS_TYPE[mean_type],
                                           variance_type="fixed_small", clip_sample=False), diffusion)
    xt, out = _inputs(1)
    for step in (999, 500, 1):
        ref = sched.step(out, step, xt, generator=torch.Generator().manual_seed(step)).prev_sample
        noise = torch.randn(xt.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        t = torch.full((xt.shape[0],), step)
        ours, _ = diffusion.p_sample(lambda x, tt: out, xt, t, noise, clip_denoised=False)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("mean_type,ztsnr", PARAM_SCHEDULES)
def test_ddim25_loop_equals_diffusers(mean_type, ztsnr):
    """Every step of DDIM 25 (the paper's appendix sampler), with one model that depends on x_t and t."""
    cfg = _cfg(mean_type, ztsnr)
    sched = DDIMScheduler(num_train_timesteps=1000, prediction_type=DIFFUSERS_TYPE[mean_type], clip_sample=False,
                          set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    _with_our_tables(sched, create_diffusion(cfg))
    sched.set_timesteps(25)

    def model(x, t, **kw):
        return 0.7 * x + 0.1 * torch.cos(t.to(x.dtype) / 100).reshape(-1, 1, 1, 1)

    x_t, _ = _inputs(2)
    seen = []

    def recording(x, t, **kw):
        seen.append(x.clone())
        return model(x, t)

    ours = sample(recording, cfg, x_t.shape, sampler="ddim", clip_denoised=False, timestep_respacing="ddim25",
                  device="cpu", x_T=x_t)
    x = x_t
    for k, step in enumerate(sched.timesteps):
        torch.testing.assert_close(seen[k], x, rtol=0, atol=1e-9)
        x = sched.step(model(x, torch.full((x.shape[0],), int(step))), int(step), x).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-9)


@pytest.mark.parametrize("mean_type", ["epsilon", "x0", "v"])
def test_dpmpp2m_steps_equal_diffusers(mean_type):
    """DPM-Solver++(2M) over our quad10 timesteps: every solver state equals diffusers' (first-order first step,
    second-order multistep after it). The last solver step differs by design: ours is first order (samplers.py,
    "lower order final"), diffusers' second order, so the comparison stops at the state it enters."""
    cfg = _cfg(mean_type)
    diffusion = create_diffusion(cfg, "quad10")
    steps = [int(t) for t in reversed(diffusion.timestep_map)]
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type=DIFFUSERS_TYPE[mean_type],
                                        algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
                                        final_sigmas_type="zero")
    _with_our_tables(sched, create_diffusion(cfg))
    sched.alpha_t, sched.sigma_t = sched.alphas_cumprod.sqrt(), (1 - sched.alphas_cumprod).sqrt()
    sched.lambda_t = sched.alpha_t.log() - sched.sigma_t.log()
    sched.set_timesteps(timesteps=steps)
    sched.sigmas = sched.sigmas.double()  # diffusers rounds them to float32; its update itself runs in float32

    def model(x, t, **kw):
        return 0.5 * x + 0.2 * torch.sin(t.to(x.dtype) / 150).reshape(-1, 1, 1, 1)

    x_t, _ = _inputs(3)
    seen = []

    def recording(x, t, **kw):
        seen.append(x.clone())
        return model(x, t)

    sample(recording, cfg, x_t.shape, sampler="dpmpp2m", timestep_respacing="quad10", clip_denoised=False,
           device="cpu", x_T=x_t)
    x = x_t
    for k, step in enumerate(steps[:-1]):
        err = ((seen[k] - x).abs().max() / x.abs().max()).item()  # diffusers' float32 update: relative 1e-6
        assert err < 1e-6, f"state entering step {k} (t = {step}) differs by {err:.2e} of its largest value"
        x = sched.step(model(x, torch.full((x.shape[0],), step)), step, x).prev_sample.double()


@pytest.mark.parametrize("mean_type", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("weighting", ["none", "min_snr", "truncated_snr"])
def test_loss_weightings_are_the_named_x0_space_weights(mean_type, weighting):
    """loss = mse_weights(t) * the parameterization's MSE equals w(SNR) * ||x_0 - x_0-hat||^2 for every
    parameterization, with w = the parameterization's own weight ("none"), min(SNR, 5) or max(SNR, 1); the
    min-SNR factors are diffusers' (examples/text_to_image: min(snr, gamma) / snr for epsilon, / (snr + 1) for v)."""
    cfg = _cfg(mean_type, loss_weighting=weighting, min_snr_gamma=5.0)
    diffusion = create_diffusion(cfg)
    x0, noise = _inputs(4)
    x0, noise = x0.float(), noise.float()
    t = torch.tensor([5, 900])
    out = torch.randn_like(x0)
    losses = diffusion.training_losses(lambda x, tt: out, x0, t, noise=noise)
    snr = torch.from_numpy(diffusion.snr)[t].float()
    x0_err = ((losses["pred_x0"] - x0) ** 2).mean(dim=(1, 2, 3))
    own = {"epsilon": snr, "x0": torch.ones_like(snr), "v": snr + 1}[mean_type]
    w = {"none": own, "min_snr": snr.clamp(max=5.0), "truncated_snr": snr.clamp(min=1.0)}[weighting]
    torch.testing.assert_close(losses["loss"], w * x0_err, rtol=1e-4, atol=0)
    if weighting == "min_snr" and mean_type != "x0":
        sched = DDPMScheduler(num_train_timesteps=1000)
        _with_our_tables(sched, diffusion)
        snr_ref = compute_snr(sched, t)
        ref = torch.minimum(snr_ref, torch.full((2,), 5.0)) / (snr_ref + (1 if mean_type == "v" else 0))
        torch.testing.assert_close(diffusion.mse_weights(t), ref.float(), rtol=1e-6, atol=0)


class VOracle:
    """The optimal x_0 (as v or x0 output) for N(MU, S^2) data: E[x_0 | x_t] is linear in x_t."""

    def __init__(self, cfg: DiffusionConfig):
        self.abar = torch.from_numpy(create_diffusion(cfg).alphas_cumprod)
        self.mean_type = cfg.model_mean_type

    def __call__(self, x, t, **kw):
        a = self.abar[t].reshape(-1, 1, 1, 1).to(x.dtype)
        x0 = MU + a.sqrt() * S**2 * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)
        return x0 if self.mean_type == "x0" else (a.sqrt() * x - x0) / (1 - a).sqrt()


@pytest.mark.parametrize("sampler,steps", [("ddpm", 250), ("ddim", 250), ("dpmpp2m", 20)])
@pytest.mark.parametrize("ztsnr", [False, True])
def test_v_prediction_samplers_reproduce_the_data(sampler, steps, ztsnr):
    cfg = _cfg("v", ztsnr)
    x = sample(VOracle(cfg), cfg, SHAPE, sampler=sampler, steps=steps, clip_denoised=False, seeds=range(SHAPE[0]))
    assert torch.isfinite(x).all()
    assert x.mean().item() == pytest.approx(MU, abs=0.02)
    assert x.std().item() == pytest.approx(S, rel=0.04)


def test_pred_x0_carries_the_gradient():
    cfg = _cfg("v", loss_weighting="min_snr")
    diffusion = create_diffusion(cfg)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    w = torch.ones((), requires_grad=True)
    losses = diffusion.training_losses(lambda x, t: w * x, x0, torch.tensor([10, 600]))
    losses["pred_x0"].sum().backward()
    assert w.grad is not None and w.grad.abs() > 0


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m", "ddpm"])
def test_one_step_sampling_returns_the_x0_estimate_at_pure_noise(sampler):
    """steps=1 is one network evaluation at t = T - 1 whose x_0 estimate is the sample (not t = 0 fed noise)."""
    cfg = _cfg("v", ztsnr=True)
    seen = []
    oracle = VOracle(cfg)

    def model(x, t, **kw):
        seen.append(int(t[0]))
        return oracle(x, t)

    x = sample(model, cfg, (4, 1, 8, 8), sampler=sampler, steps=1, clip_denoised=False, seeds=range(4))
    assert seen == [999]
    torch.testing.assert_close(x, torch.full_like(x, MU), rtol=0, atol=1e-5)  # E[x_0 | pure noise] = MU
