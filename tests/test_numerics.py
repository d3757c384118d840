"""Numerics under the precision we train in (bf16 autocast), and the small conventions that change a model.

Each test here failed on the code before issue 12: the codebook search under autocast, the EMA horizon of the
presets, the fp32 edges of the UNet, the unclamped learned variance, improved-diffusion's respacing ties and
DPM-Solver++'s float64 coefficients.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from divae.quantizer import QuantizerConfig, VectorQuantizer, kmeans, nearest_code
from divae.utils.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


# ---- 1. the nearest-code search ----------------------------------------------------------------------------
def _offset_codebook(k: int = 2048, d: int = 64, n: int = 1024, seed: int = 0):
    """Codes that sit away from the origin (as after some training): c0 + 0.05 noise, and inputs near them."""
    g = torch.Generator().manual_seed(seed)
    c0 = torch.randn(d, generator=g)
    return c0 + 0.05 * torch.randn(n, d, generator=g), c0 + 0.05 * torch.randn(k, d, generator=g)


def test_nearest_code_under_bf16_autocast_equals_fp32_and_float64():
    z, cb = _offset_codebook()
    exact = torch.cdist(z.double(), cb.double()).argmin(1)
    fp32 = nearest_code(z, cb)
    with torch.autocast(**BF16):
        auto = nearest_code(z, cb)
        auto_bf16_inputs = nearest_code(z.bfloat16().float(), cb)  # what a bf16 encoder hands over
    assert torch.equal(fp32, exact)
    assert torch.equal(auto, fp32)
    assert torch.equal(auto_bf16_inputs, nearest_code(z.bfloat16().float(), cb))
    assert torch.equal(nearest_code(z, cb, budget=cb.shape[0] * 7), fp32)  # chunked rows agree


def test_quantizer_forward_under_autocast_assigns_like_fp32_encode():
    z, cb = _offset_codebook(k=512, d=16, n=4 * 8 * 8)
    for use_ema in (False, True):
        vq = VectorQuantizer(512, 16, QuantizerConfig(use_ema=use_ema)).train()
        with torch.no_grad():
            vq.codebook.copy_(cb)
        ze = z.view(4, 8, 8, 16).permute(0, 3, 1, 2).contiguous()
        ref = vq.encode(ze)  # fp32, no autocast
        with torch.autocast(**BF16):
            _, idx, _, _ = vq(ze)
        assert torch.equal(idx, ref), f"use_ema={use_ema}: {(idx != ref).float().mean():.1%} differ"


def test_kmeans_under_autocast_matches_fp32():
    z, _ = _offset_codebook(n=512, d=8)
    torch.manual_seed(3)
    ref = kmeans(z, 16, 5)
    torch.manual_seed(3)
    with torch.autocast(**BF16):
        got = kmeans(z, 16, 5)
    assert torch.equal(got, ref)


# ---- 2. the EMA horizon --------------------------------------------------------------------------------------
def _init_share(decay: float, warmup: bool, steps: int) -> float:
    """Weight of the initial parameters in the EMA after `steps` updates (trainer.ema's rule)."""
    share = 1.0
    for n in range(steps):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        share *= d
    return share


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_exports_an_ema_of_trained_weights(path):
    from trainer.config import load_train_config

    cfg = load_train_config(path)  # refuses a horizon beyond 20% of train.steps
    if cfg.ema.enabled:
        assert _init_share(cfg.ema.decay, cfg.ema.warmup, cfg.train.steps) < 0.01


def test_long_ema_without_warmup_is_refused_with_the_fix():
    from trainer.config import EMA_HORIZON_MAX_FRACTION, load_train_config

    with pytest.raises(ConfigError, match=r"37% initial weights.*ema.warmup=true.*ema.decay<=0.9995"):
        load_train_config(ROOT / "configs/decoder_f16.yaml", ["ema.warmup=false"])
    # just inside the bound: a horizon of 20% of the steps passes
    steps = math.ceil(1 / (1 - 0.999) / EMA_HORIZON_MAX_FRACTION) + 1
    load_train_config(ROOT / "configs/decoder_f16.yaml",
                      ["ema.warmup=false", "ema.decay=0.999", f"train.steps={steps}"])
    load_train_config(ROOT / "configs/decoder_f16.yaml", ["ema.warmup=false", "ema.enabled=false"])


def test_data_batch_size_is_derived_not_silently_replaced():
    from trainer.config import load_train_config

    cfg = load_train_config(ROOT / "configs/decoder_tiny.yaml", ["train.batch_size=8", "train.grad_accum=2"])
    assert cfg.data.batch_size == 0 and cfg.per_rank_batch(2) == 2
    cfg = load_train_config(ROOT / "configs/decoder_tiny.yaml", ["train.batch_size=8", "data.batch_size=2"])
    assert cfg.per_rank_batch(4) == 2  # an explicit value that agrees is fine
    with pytest.raises(ConfigError, match="data.batch_size=2 but train.batch_size=8 over 1 rank.*remove data.batch"):
        cfg.per_rank_batch(1)


# ---- 4. fp32 edges of the UNet ------------------------------------------------------------------------------
def _tiny_unet(fp32_edges: bool = True):
    from dataclasses import replace

    from divae.unet import UNET_PRESETS, UNetModel

    torch.manual_seed(0)
    model = UNetModel(replace(UNET_PRESETS["tiny"], fp32_edges=fp32_edges))
    for p in model.out.parameters():  # the output conv starts at zero: give it weights to see through it
        torch.nn.init.normal_(p, std=0.05)
    return model


def test_unet_input_conv_sees_x_t_in_fp32_under_bf16():
    """At t = 0, x_t = x_0 + 0.01 eps: a perturbation below bf16's resolution must still reach the body."""
    model = _tiny_unet().bfloat16()
    seen = []
    model.input_blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].float()))
    x = torch.full((1, 3, 64, 64), 0.8)
    t = torch.zeros(1, dtype=torch.long)
    cond = torch.randn(1, 8, 8, 8)
    with torch.autocast(**BF16):
        out_a = model(x, t, cond)
        model(x + 1e-3, t, cond)  # 1e-3 < half a bf16 ulp at 0.8 (2^-8 / 2 = 2e-3): lost if cast first
    assert out_a.dtype == torch.float32  # the output layer (epsilon and v) runs in fp32
    assert not torch.equal(seen[0], seen[1])

    old = _tiny_unet(fp32_edges=False).bfloat16()
    seen.clear()
    old.input_blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].float()))
    with torch.autocast(**BF16):
        out_old = old(x, t, cond)
        old(x + 1e-3, t, cond)
    assert out_old.dtype == torch.bfloat16 and torch.equal(seen[0], seen[1])  # the former behaviour


def test_unet_edges_match_fp32_reference_more_closely():
    """Under bf16 autocast the output with fp32 edges is closer to the fp32 model's than with bf16 edges."""
    ref_model = _tiny_unet()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    t = torch.tensor([0, 3, 10, 500])
    cond = torch.randn(4, 8, 8, 8, generator=g)
    with torch.no_grad():
        ref = ref_model(x, t, cond)
        errs = {}
        for edges in (True, False):
            m = _tiny_unet(edges)
            with torch.autocast(**BF16):
                errs[edges] = (m(x, t, cond).float() - ref).pow(2).mean().item()
    assert errs[True] < errs[False], errs


def test_edge_layers_ignore_autocast_and_keep_gradients():
    from divae.unet_blocks import EdgeConv2d, EdgeGroupNorm, EdgeLinear

    x = torch.randn(2, 4, 8, 8)
    for layer, ref_fn in ((EdgeConv2d(4, 6, 3, padding=1), lambda m: torch.nn.functional.conv2d(
                               x, m.weight.float(), m.bias.float(), padding=1)),
                          (EdgeGroupNorm(2, 4), lambda m: torch.nn.functional.group_norm(
                              x, 2, m.weight.float(), m.bias.float())),
                          (EdgeLinear(8, 3), lambda m: torch.nn.functional.linear(
                              x, m.weight.float(), m.bias.float()))):
        torch.nn.init.normal_(layer.weight)
        layer = layer.bfloat16()
        with torch.autocast(**BF16):
            y = layer(x)
        assert y.dtype == torch.float32
        assert torch.allclose(y, ref_fn(layer), atol=1e-5)
        y.sum().backward()
        assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.bfloat16
        layer.fp32 = False  # the plain layer: autocast's bf16
        with torch.autocast(**BF16):
            assert layer(x.bfloat16()).dtype == torch.bfloat16


# ---- 5. the learned-range variance is not clamped -------------------------------------------------------
def test_variance_v_settles_where_the_vlb_optimum_lies_outside_the_range():
    """With a mean error the range [beta~_t, beta_t] cannot cover, the vlb optimum of v lies above 1.
    Gradient descent on v must settle there (gradient -> 0), not drift on as a straight-through clamp lets it."""
    from divae.diffusion import DiffusionConfig, create_diffusion

    diffusion = create_diffusion(DiffusionConfig(loss="hybrid", model_var_type="learned_range"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([40, 40])
    xt = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    eps = torch.randn(x0.shape, generator=g)  # a wrong epsilon: the mean is off by far more than beta_t allows
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([v], lr=3000.0)  # vb is flat in v: a large step; the clamp drifted to v = 667 here
    trace = []
    for _ in range(200):
        out = diffusion.p_from_output(torch.cat([eps, v.expand_as(eps)], 1), xt, t)
        vb = diffusion.vb_terms_bpd(out, x0, xt, t).mean()
        opt.zero_grad()
        vb.backward()
        opt.step()
        trace.append((v.item(), v.grad.item()))
    v_end, grad_end = trace[-1]
    assert v_end > 1.0  # the optimum is outside the nominal range ...
    assert abs(grad_end) < 1e-6 and abs(v_end - trace[-50][0]) < 1e-3  # ... and v settles there
    assert v_end < 20


# ---- 9. conventions shared with improved-diffusion -------------------------------------------------------
def _improved_diffusion_steps(num_timesteps: int, count: int) -> set[int]:
    """improved-diffusion's rule for one section: a fractional stride accumulated by repeated addition,
    each position rounded half to even."""
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    pos, out = 0.0, []
    for _ in range(count):
        out.append(round(pos))
        pos += stride
    return set(out)


def test_plain_respacing_matches_improved_diffusion_for_every_n():
    from divae.diffusion.respace import space_timesteps

    bad = [n for n in range(1, 1001) if space_timesteps(1000, str(n)) != _improved_diffusion_steps(1000, n)]
    assert bad == []
    assert space_timesteps(1000, "250") == _improved_diffusion_steps(1000, 250)


def test_dpmpp2m_float64_sampling_has_float64_coefficients():
    """A linear 'model' (eps = 0.3 x) sampled in float64 equals the same DPM-Solver++(2M) recursion carried out
    in numpy float64 to 1e-12 (a float32 expm1(-h) gave ~3e-8)."""
    from divae.diffusion import DiffusionConfig, create_diffusion
    from divae.diffusion.samplers import dpmpp2m_loop

    diffusion = create_diffusion(DiffusionConfig(model_var_type="fixed_small", loss="simple"), "quad10")
    x_T = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = dpmpp2m_loop(diffusion, lambda x, t: 0.3 * x, lambda: x_T.clone(), clip_denoised=False)

    abar = diffusion.alphas_cumprod
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    lam = np.log(alpha) - np.log(sigma)
    steps = list(reversed(range(diffusion.num_timesteps)))
    x, d_prev, h_prev = x_T.numpy().copy(), None, None
    for k, i in enumerate(steps):
        d = (x - sigma[i] * 0.3 * x) / alpha[i]
        if k == len(steps) - 1:
            x = d
            break
        j = steps[k + 1]
        h = lam[j] - lam[i]
        du = d if d_prev is None or k == len(steps) - 2 else (1 + h / (2 * h_prev)) * d - h / (2 * h_prev) * d_prev
        x = sigma[j] / sigma[i] * x - alpha[j] * math.expm1(-h) * du
        d_prev, h_prev = d, h
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), x, rtol=1e-12, atol=1e-14)
