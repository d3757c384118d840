"""Closed-form checks of the Gaussian diffusion: schedules, forward process, posterior, losses, respacing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from divae.diffusion import (
    DiffusionConfig,
    LossSecondMomentResampler,
    UniformSampler,
    create_diffusion,
    get_named_beta_schedule,
    space_timesteps,
)
from divae.diffusion.gaussian_diffusion import GaussianDiffusion
from divae.diffusion.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood


def test_linear_and_cosine_schedules():
    lin = get_named_beta_schedule("linear", 1000)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    lin250 = get_named_beta_schedule("linear", 250)
    assert lin250[0] == pytest.approx(4e-4) and lin250[-1] == pytest.approx(0.08)
    cos = get_named_beta_schedule("cosine", 1000)
    assert cos.max() <= 0.999 and (np.diff(cos) >= 0).all()
    abar = np.cumprod(1 - cos)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    assert abar[499] == pytest.approx(f(0.5) / f(0.0), rel=1e-6)
    with pytest.raises(ValueError, match="noise_schedule"):
        get_named_beta_schedule("quadratic", 10)


def test_q_sample_moments_match_closed_form():
    diff = create_diffusion(DiffusionConfig())
    torch.manual_seed(0)
    x0 = torch.tensor([-0.8, 0.1, 0.9]).reshape(1, 3, 1, 1)
    n = 40000
    for t_val in (0, 300, 999):
        t = torch.full((n,), t_val, dtype=torch.long)
        xt = diff.q_sample(x0.expand(n, 3, 1, 1), t)
        abar = diff.alphas_cumprod[t_val]
        mean, var = xt.mean(0).flatten(), xt.var(0).flatten()
        torch.testing.assert_close(mean, math.sqrt(abar) * x0.flatten(), atol=0.02, rtol=0)
        torch.testing.assert_close(var, torch.full((3,), 1 - abar), atol=0, rtol=0.03)


def test_posterior_equals_bayes_rule():
    """q(x_{t-1}|x_t,x_0) from q(x_{t-1}|x_0) q(x_t|x_{t-1}) by completing the square, in float64."""
    diff = create_diffusion(DiffusionConfig(noise_schedule="cosine"))
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    xt = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 400, 900, 999])
    mean, var, log_var = diff.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        abar_prev, alpha, beta = diff.alphas_cumprod[ti - 1], 1 - diff.betas[ti], diff.betas[ti]
        precision = 1 / (1 - abar_prev) + alpha / beta
        v = 1 / precision
        m = v * (math.sqrt(abar_prev) * x0[i] / (1 - abar_prev) + math.sqrt(alpha) * xt[i] / beta)
        torch.testing.assert_close(var[i].flatten(), torch.full((1,), v, dtype=torch.float64), rtol=1e-10, atol=0)
        torch.testing.assert_close(mean[i], m, rtol=1e-9, atol=1e-12)
        assert log_var[i].item() == pytest.approx(math.log(v), rel=1e-10)
    # at t = 0 the variance is 0 and its log is clipped to that of t = 1
    _, var0, log_var0 = diff.q_posterior_mean_variance(x0[:1], xt[:1], torch.tensor([0]))
    assert var0.item() == 0.0 and log_var0.item() == pytest.approx(math.log(diff.posterior_variance[1]))


def test_discretized_gaussian_sums_to_one_over_256_bins():
    x = (torch.arange(256, dtype=torch.float64) * 2 / 255 - 1).reshape(256, 1)
    means = torch.tensor([[-1.2, -0.3, 0.0, 0.77, 1.1]], dtype=torch.float64)
    log_scales = torch.tensor([[-6.0, -3.0, -1.0, 0.0, 0.5]], dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(x.expand(256, 5), means=means, log_scales=log_scales)
    torch.testing.assert_close(logp.exp().sum(0), torch.ones(5, dtype=torch.float64), atol=1e-6, rtol=0)
    # the tanh CDF approximation is close to the exact normal CDF
    z = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    assert (approx_standard_normal_cdf(z) - torch.special.ndtr(z)).abs().max() < 3e-4


def _exact_noise_model(noise, c):
    """A model that outputs the true noise and v = -1 (Sigma = beta~_t): the exact posterior."""

    def model(x, t, **kw):
        return torch.cat([noise, -torch.ones_like(noise[:, :c])], dim=1)

    return model


def test_vb_is_zero_for_a_model_that_outputs_the_true_posterior():
    diff = create_diffusion(DiffusionConfig())
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(5, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 5, 100, 500, 999])
    out = diff.training_losses(_exact_noise_model(noise, 3), x0, t, noise=noise)
    assert out["vb"].shape == (5,) and out["mse"].shape == (5,) and out["loss"].shape == (5,)
    assert out["vb"].abs().max().item() < 1e-9
    assert out["mse"].abs().max().item() < 1e-12
    # a wrong mean gives a positive KL
    bad = diff.training_losses(_exact_noise_model(noise + 0.1, 3), x0, t, noise=noise)
    assert (bad["vb"][1:] > 1e-6).all()
    # at t = 0 the term is the discretized NLL: positive, finite
    x0q = torch.round((x0 + 1) * 127.5) / 127.5 - 1
    nll = diff.training_losses(_exact_noise_model(noise, 3), x0q, torch.zeros(5, dtype=torch.long), noise=noise)
    assert torch.isfinite(nll["vb"]).all() and (nll["vb"] > 0).all()


def test_learned_variance_interpolates_log_variance_between_posterior_variance_and_beta():
    """v in [-1, 1] gives a variance between beta~_t and beta_t (log-linear in v); v outside is not clamped:
    log Sigma extrapolates on the same line (improved-diffusion's rule)."""
    diff = create_diffusion(DiffusionConfig())
    t = torch.arange(1000)
    xt = torch.randn(1000, 3, 2, 2)
    lo = torch.from_numpy(np.exp(diff.posterior_log_variance_clipped)).reshape(-1, 1, 1, 1)
    hi = torch.from_numpy(diff.betas).reshape(-1, 1, 1, 1)
    v = torch.rand(1000, 3, 2, 2) * 2 - 1
    var = diff.p_from_output(torch.cat([torch.randn(1000, 3, 2, 2), v], dim=1), xt, t)["variance"].double()
    assert (var >= lo * (1 - 1e-5)).all() and (var <= hi * (1 + 1e-5)).all()
    # v = 1 gives beta_t, v = -1 gives beta~_t, v = 3 gives beta_t^2 / beta~_t (one more step on the log line)
    ones = torch.ones(1000, 3, 2, 2)
    for v_val, expected in ((1.0, hi), (-1.0, lo), (3.0, hi**2 / lo)):
        got = diff.p_from_output(torch.cat([ones, v_val * ones], 1), xt, t)["variance"].double()
        torch.testing.assert_close(got, expected.expand_as(got), rtol=1e-5, atol=0)


def test_hybrid_vb_trains_only_the_variance():
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    t = torch.tensor([0, 10, 300, 999])
    for loss, mean_grad in (("hybrid", False), ("kl", True)):
        diff = create_diffusion(DiffusionConfig(loss=loss))
        p = torch.nn.Parameter(torch.randn(4, 6, 4, 4, generator=g) * 0.5)
        out = diff.training_losses(lambda x, t, p=p, **kw: p * 1.0, x0, t)
        out["vb"].sum().backward()
        assert (p.grad[:, 3:].abs().sum() > 0).item()
        assert (p.grad[:, :3].abs().sum() > 0).item() == mean_grad
    # hybrid loss = mse + lambda * T * vb
    diff = create_diffusion(DiffusionConfig())
    p = torch.randn(4, 6, 4, 4, generator=g)
    out = diff.training_losses(lambda x, t, **kw: p, x0, t)
    torch.testing.assert_close(out["loss"], out["mse"] + 0.001 * 1000 * out["vb"])


def test_simple_loss_with_fixed_variance_and_x0_prediction():
    diff = create_diffusion(DiffusionConfig(model_var_type="fixed_small", loss="simple", model_mean_type="x0"))
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    out = diff.training_losses(lambda x, t, **kw: x0.clone(), x0, torch.tensor([3, 700]))
    assert out["mse"].abs().max() == 0 and torch.equal(out["loss"], out["mse"])
    with pytest.raises(ValueError, match="learn_sigma"):
        create_diffusion(DiffusionConfig()).training_losses(lambda x, t: x, x0, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="learned_range"):
        DiffusionConfig(model_var_type="fixed_small")  # hybrid needs a learned variance
    with pytest.raises(ValueError, match="noise_schedule"):
        DiffusionConfig(noise_schedule="cosin")


def test_respacing_all_steps_equals_the_original():
    cfg = DiffusionConfig()
    base = GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000))
    for respacing in ("", "1000"):
        sp = create_diffusion(cfg, respacing)
        assert sp.timestep_map == list(range(1000))
        np.testing.assert_allclose(sp.betas, base.betas, rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(sp.posterior_variance, base.posterior_variance, rtol=1e-9, atol=1e-15)


def test_respacing_25_steps_has_the_right_betas():
    cfg = DiffusionConfig()
    base = create_diffusion(cfg)
    sp = create_diffusion(cfg, "25")
    kept = sp.timestep_map
    assert len(kept) == 25 and kept[0] == 0 and kept[-1] == 999
    np.testing.assert_allclose(sp.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-10)
    prev = np.append(1.0, base.alphas_cumprod[kept][:-1])
    np.testing.assert_allclose(sp.betas, 1 - base.alphas_cumprod[kept] / prev, rtol=1e-10)
    assert sorted(space_timesteps(1000, "ddim25")) == list(range(0, 1000, 40))
    sections = sorted(space_timesteps(300, "10,15,20"))
    assert len(sections) == 45
    assert sum(t < 100 for t in sections) == 10 and sum(100 <= t < 200 for t in sections) == 15
    with pytest.raises(ValueError, match="stride"):
        space_timesteps(1000, "ddim2000")
    with pytest.raises(ValueError, match="expected"):
        space_timesteps(1000, "fast")
    # the model sees original timesteps through the respaced diffusion
    seen = []
    sp.training_losses(lambda x, t, **kw: (seen.append(t.clone()), torch.zeros(1, 6, 2, 2))[1],
                       torch.zeros(1, 3, 2, 2), torch.tensor([24]))
    assert seen[0].item() == 999


def test_quartile_losses_split_t_at_quarters_of_T():
    """The decoder stage's logged loss by timestep quartile: q holds t in [q T/4, (q+1) T/4), empty ones left out."""
    from trainer.tasks.base import device_quartile_losses, host_means

    t = torch.tensor([0, 249, 250, 999, 998])
    q = device_quartile_losses(t, torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0]), 1000, "mse")
    assert host_means({k: [v] for k, v in q.items()}) == {"mse_q0": 2.0, "mse_q1": 5.0, "mse_q3": 8.0}


def test_loss_second_moment_resampler_is_unbiased_and_prefers_large_losses():
    T = 20
    rs = LossSecondMomentResampler(T, history_per_term=4, uniform_prob=0.0)
    assert np.allclose(rs.weights(), 1.0)  # uniform until warmed up
    losses = np.where(np.arange(T) < 10, 10.0, 1.0)
    for _ in range(4):
        rs.update_with_local_losses(torch.arange(T), torch.from_numpy(losses))
    w = rs.weights()
    assert w[0] == pytest.approx(10 * w[-1])
    g = torch.Generator().manual_seed(0)
    t, weights = rs.sample(200000, generator=g)
    assert (t < 10).float().mean().item() == pytest.approx(10 / 11, abs=0.01)
    f = torch.arange(T, dtype=torch.float32) ** 2
    assert (weights * f[t]).mean().item() == pytest.approx(f.mean().item(), rel=0.02)
    t_u, w_u = UniformSampler(T).sample(64, generator=g)
    assert torch.all(w_u == 1) and t_u.min() >= 0 and t_u.max() < T
    state = rs.state_dict()
    rs2 = LossSecondMomentResampler(T, history_per_term=4, uniform_prob=0.0)
    rs2.load_state_dict(state)
    np.testing.assert_allclose(rs2.weights(), w)
