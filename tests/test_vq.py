"""VQModel contract, presets, and the VQGAN losses (adaptive weight, hinge / non-saturating values)."""

from dataclasses import replace

import pytest
import torch

from divae.quantizer import QuantizerConfig
from divae.vq import VQ_PRESETS, VQConfig, VQModel, param_counts
from divae.vq_loss import (
    LastLayerTap,
    PatchDiscriminator,
    VQLoss,
    VQLossConfig,
    adaptive_weight,
    generator_adv_loss,
    hinge_d_loss,
    non_saturating_d_loss,
)

# very small but complete: attention, two levels of downsampling, mid block
MICRO = VQConfig(resolution=16, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=8,
                 norm_groups=4, n_embed=32, embed_dim=6)


def test_contract_shapes_and_consistency():
    torch.manual_seed(0)
    m = VQModel(MICRO).eval()
    x = torch.rand(2, 3, 16, 24) * 2 - 1  # non-square, multiple of f = 4
    idx = m.encode(x)
    assert idx.shape == (2, 4, 6) and idx.dtype == torch.long
    z_q = m.embed(idx)
    assert z_q.shape == (2, MICRO.embed_dim, 4, 6)
    zq2, idx2, loss, stats = m.quantize(x)
    assert torch.equal(idx2, idx) and torch.allclose(zq2, z_q, atol=1e-6)
    assert loss.dim() == 0 and {"usage", "perplexity"} <= set(stats)
    x_hat, qloss, _ = m(x)
    assert x_hat.shape == x.shape
    assert torch.allclose(m.decode(z_q), x_hat, atol=1e-5)
    assert torch.allclose(qloss, loss)
    assert m.last_layer() is m.decoder.conv_out


def test_bad_inputs_raise_clear_errors():
    m = VQModel(MICRO)
    with pytest.raises(ValueError, match="multiple of the downsampling factor 4"):
        m.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match="expected images"):
        m.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="expected z_q"):
        m.decode(torch.zeros(1, 5, 4, 4))
    with pytest.raises(ValueError, match="divisible by norm_groups"):
        VQModel(replace(MICRO, ch=6))


def test_gradients_reach_encoder_through_quantizer_and_checkpointing_matches():
    torch.manual_seed(0)
    cfgs = [MICRO, replace(MICRO, grad_checkpointing=True)]
    grads = []
    for cfg in cfgs:
        torch.manual_seed(0)
        m = VQModel(cfg)
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
        x_hat, qloss, _ = m(x)
        ((x_hat - x).abs().mean() + qloss).backward()
        assert m.encoder.conv_in.weight.grad.abs().sum() > 0
        assert m.quantizer.codebook.grad.abs().sum() > 0
        grads.append(m.encoder.conv_in.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_presets_build_and_downsample():
    assert {"tiny", "vq_f16", "vq_f8"} <= set(VQ_PRESETS)
    assert VQ_PRESETS["vq_f16"].downsample_factor == 16 and VQ_PRESETS["vq_f16"].n_embed == 16384
    assert VQ_PRESETS["vq_f8"].downsample_factor == 8 and VQ_PRESETS["vq_f8"].n_embed == 8192
    c16 = param_counts(VQ_PRESETS["vq_f16"])
    # taming's ImageNet f16 VQGAN autoencoder has ~72M parameters (without the loss modules)
    assert 60e6 < c16["total"] < 90e6
    assert c16["codebook"] == 16384 * 256
    m = VQModel(VQ_PRESETS["tiny"]).eval()
    with torch.no_grad():
        assert m.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 8, 8)
    ema = param_counts(replace(VQ_PRESETS["tiny"], quantizer=QuantizerConfig(use_ema=True)))
    assert ema["total"] == param_counts(VQ_PRESETS["tiny"])["total"]


def test_hinge_and_non_saturating_values_on_hand_made_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = [0, 0.5, 2]
    fake = torch.tensor([-2.0, 0.0, 1.5])  # relu(1 + fake) = [0, 1, 2.5]
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))
    sp = torch.nn.functional.softplus
    assert float(non_saturating_d_loss(real, fake)) == pytest.approx(
        0.5 * (float(sp(-real).mean()) + float(sp(fake).mean())))
    assert float(generator_adv_loss(fake, "hinge")) == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)
    assert float(generator_adv_loss(torch.tensor([0.0]), "non_saturating")) == pytest.approx(0.693147, rel=1e-5)


def test_adaptive_weight_matches_autograd_on_the_weight():
    """The one adaptive-weight implementation (gradient at the conv output -> conv2d_weight) equals
    torch.autograd.grad with respect to the weight itself, for strided, padded and grouped convs."""
    torch.manual_seed(0)
    for kw in ({"padding": 1}, {"stride": 2, "padding": 1}, {"groups": 2, "dilation": 2, "padding": 2}):
        conv = torch.nn.Conv2d(4, 6, 3, **kw)
        tap = LastLayerTap(conv)
        h = torch.randn(3, 4, 9, 9, requires_grad=True)
        y = conv(h.tanh())
        nll = y.pow(2).mean()
        g = -(y.sin()).mean()
        for loss in (nll, g):
            ref = torch.autograd.grad(loss, conv.weight, retain_graph=True)[0]
            got = tap.weight_grad(loss)
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-7), kw
        gn = torch.autograd.grad(nll, conv.weight, retain_graph=True)[0].norm()
        gg = torch.autograd.grad(g, conv.weight, retain_graph=True)[0].norm()
        lam = adaptive_weight(nll, g, tap, disc_weight=0.8)
        assert float(lam) == pytest.approx(float(gn / (gg + 1e-4) * 0.8), rel=1e-5)
        assert not lam.requires_grad
        # clamp at max_weight when the adversarial gradient vanishes
        lam0 = adaptive_weight(100 * nll, (y * 0).sum(), tap, disc_weight=1.0, max_weight=1e4)
        assert float(100 * gn / 1e-4) > 1e4
        assert float(lam0) == pytest.approx(1e4)
        tap.clear()
        with pytest.raises(RuntimeError, match="no forward"):
            tap.weight_grad(nll)


def test_vq_loss_disc_start_and_generator_weight():
    torch.manual_seed(0)
    m = VQModel(MICRO)
    cfg = VQLossConfig(perceptual_weight=0.0, disc_start=10, disc_ndf=8, disc_n_layers=2, disc_weight=0.5)
    loss_fn = VQLoss(cfg)
    assert loss_fn.lpips is None
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    tap = LastLayerTap(m.last_layer())
    x_hat, qloss, _ = m(x)
    before, logs = loss_fn.generator_loss(x, x_hat, qloss, step=9, tap=tap)
    assert "g_loss" not in logs
    assert float(before.detach()) == pytest.approx(float((x - x_hat).abs().mean().detach() + qloss.detach()), rel=1e-6)
    d_before, _ = loss_fn.discriminator_loss(x, x_hat, step=9)
    assert float(d_before.detach()) == 0.0
    after, logs = loss_fn.generator_loss(x, x_hat, qloss, step=10, tap=tap)
    nll = (x - x_hat).abs().mean()  # l1_weight 1, no LPIPS, no L2
    g = generator_adv_loss(loss_fn.discriminator(x_hat), "hinge")
    w = m.last_layer().weight
    ref = torch.autograd.grad(nll, w, retain_graph=True)[0].norm() / (
        torch.autograd.grad(g, w, retain_graph=True)[0].norm() + 1e-4) * 0.5
    assert float(logs["d_weight"]) == pytest.approx(float(ref), rel=1e-5)
    assert float(after.detach()) == pytest.approx(float(before.detach()) + float(ref) * float(logs["g_loss"]), rel=1e-4)
    d_after, dl = loss_fn.discriminator_loss(x, x_hat, step=10)
    assert float(d_after.detach()) == pytest.approx(float(dl["d_loss"])) and float(dl["d_loss"]) > 0
    after.backward()
    assert m.encoder.conv_in.weight.grad is not None


def test_patch_discriminator_shapes_and_norms():
    for norm in ("batch", "group", "none"):
        d = PatchDiscriminator(3, ndf=8, n_layers=3, norm=norm)
        assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="disc_norm"):
        PatchDiscriminator(norm="instance")
