"""The ADM UNet: embedding injection variants, fully convolutional decoding, checkpointing, bf16, presets."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from model_fixtures import randomized

from divae.diffusion import DiffusionConfig, create_diffusion
from divae.unet import UNET_PRESETS, UNetConfig, UNetModel
from divae.unet_blocks import ResBlock, timestep_embedding
from divae.utils.params import count_parameters

SMALL = UNetConfig(image_size=32, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                   attention_resolutions=(16, 8), num_head_channels=16, cond_channels=4, token_grid=8)


def _inputs(b=2, hw=(32, 32), grid=(8, 8), d=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, *hw, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    cond = torch.randn(b, d, *grid, generator=g)
    return x, t, cond


@pytest.mark.parametrize(
    "position,method", list(itertools.product(["encoder", "middle", "decoder"], ["concat", "add", "attention"]))
)
def test_injection_variants_shape_and_gradient_wrt_zq(position, method):
    model = randomized(replace(SMALL, cond_position=position, cond_method=method))
    x, t, cond = _inputs()
    cond.requires_grad_(True)
    out = model(x, t, cond)
    assert out.shape == (2, 6, 32, 32)
    out.square().mean().backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    # the output really changes with z_q, sample by sample
    other = model(x, t, torch.roll(cond.detach(), 1, dims=0))
    assert (other - out.detach()).abs().amax(dim=(1, 2, 3)).min() > 1e-4


def test_unconditional_and_input_validation():
    model = UNetModel(replace(SMALL, cond_position="none", learn_sigma=False))
    x, t, cond = _inputs()
    assert model(x, t).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, cond)
    cond_model = UNetModel(SMALL)
    with pytest.raises(ValueError, match="pass cond"):
        cond_model(x, t)
    with pytest.raises(ValueError, match="cond_channels=4"):
        cond_model(x, t, torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match="multiples of 4"):
        cond_model(torch.randn(2, 3, 30, 32), t, cond)
    with pytest.raises(ValueError, match="cond_method"):
        UNetConfig(cond_method="film")


def test_zero_init_output_and_identity_resblocks():
    model = UNetModel(SMALL)
    x, t, cond = _inputs()
    assert model(x, t, cond).abs().max() == 0  # zero-initialised output conv
    block = ResBlock(16, 64)
    h = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(block(h, torch.randn(2, 64)), h)  # zero-initialised residual branch


def test_non_square_decode_and_other_token_grids():
    model = randomized(SMALL)
    model.eval()
    x, t, cond = _inputs(b=1, hw=(32, 48), grid=(8, 12))
    out = model(x, t, cond)
    assert out.shape == (1, 6, 32, 48) and torch.isfinite(out).all()
    # a coarser token grid is resampled to the middle block
    out2 = model(x, t, cond[:, :, ::2, ::2])
    assert out2.shape == (1, 6, 32, 48)
    # tokens act where they are: editing the tokens of the right third changes the prediction at the
    # right edge far more than at the left edge (self-attention spreads some of it everywhere)
    edited = cond.clone()
    edited[..., 8:] = torch.randn(1, 4, 8, 4, generator=torch.Generator().manual_seed(5))
    diff = (model(x, t, edited) - out).abs().mean(dim=(0, 1, 2))
    assert diff[:4].mean() < 0.5 * diff[-4:].mean()


def test_activation_checkpointing_gives_the_same_gradients():
    x, t, cond = _inputs()
    grads = []
    for ckpt in (False, True):
        model = randomized(replace(SMALL, use_checkpoint=ckpt, cond_method="attention"))
        model(x, t, cond).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_and_channels_last_on_cpu():
    model = randomized(SMALL)
    x, t, cond = _inputs()
    ref = model(x, t, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, cond)
    assert torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05
    model_cl = model.to(memory_format=torch.channels_last)
    out_cl = model_cl(x.to(memory_format=torch.channels_last), t, cond)
    torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-5)


def test_tiny_preset_train_step_runs_with_the_hybrid_loss():
    cfg = UNET_PRESETS["tiny"]
    model = UNetModel(cfg)
    diffusion = create_diffusion(DiffusionConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0 = torch.rand(2, 3, 64, 64) * 2 - 1
    z = torch.randn(2, cfg.cond_channels, cfg.token_grid, cfg.token_grid)
    t = torch.tensor([10, 700])
    losses = diffusion.training_losses(model, x0, t, model_kwargs={"cond": z})
    assert set(losses) == {"loss", "mse", "vb", "pred_x0"} and losses["pred_x0"].shape == x0.shape
    assert all(losses[k].shape == (2,) for k in ("loss", "mse", "vb"))
    losses["loss"].mean().backward()
    opt.step()
    assert model.out[-1].weight.abs().sum() > 0  # the zero-initialised output layer moved


@pytest.mark.slow
def test_tiny_unet_learns_to_denoise_a_fixed_batch():
    torch.manual_seed(0)
    cfg = UNET_PRESETS["tiny"]
    model = UNetModel(cfg)
    diffusion = create_diffusion(DiffusionConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 64, 64, generator=g).round() * 2 - 1  # sharp binary images, far from Gaussian
    z = torch.randn(2, cfg.cond_channels, 8, 8, generator=g)
    t_eval = torch.tensor([100, 400])
    noise_eval = torch.randn(2, 3, 64, 64, generator=g)

    def eval_mse():
        with torch.no_grad():
            return diffusion.training_losses(model, x0, t_eval, {"cond": z}, noise=noise_eval)["mse"].mean()

    before = eval_mse()
    for _ in range(30):
        t = torch.randint(50, 500, (2,), generator=g)
        loss = diffusion.training_losses(model, x0, t, model_kwargs={"cond": z})["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_mse() < 0.7 * before


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0, 10, 999]), 33)
    assert emb.shape == (3, 33)
    torch.testing.assert_close(emb[0, :16], torch.ones(16))  # cos(0)
    assert (emb[1] != emb[2]).any()


def test_presets_build_and_have_the_documented_middle_resolution():
    for name, cfg in UNET_PRESETS.items():
        assert cfg.image_size // cfg.downsample_factor == cfg.token_grid, name
        with torch.device("meta"):
            n = count_parameters(UNetModel(cfg))
        assert n > 0
    with torch.device("meta"):
        f16 = count_parameters(UNetModel(UNET_PRESETS["decoder_f16"]))
    assert 2e8 < f16 < 6e8  # paper scale: a few hundred million parameters


def test_architecture_matches_the_stock_adm_256_parameter_count():
    """guided-diffusion's 256x256 unconditional UNet has exactly 552,814,086 parameters."""
    cfg = UNetConfig(image_size=256, model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                     attention_resolutions=(32, 16, 8), num_head_channels=64, cond_position="none")
    with torch.device("meta"):
        assert count_parameters(UNetModel(cfg)) == 552_814_086


def test_sub_state_names_a_submodule_as_its_own_state_dict_does():
    from divae.model import DiVAE
    from divae.utils.params import sub_state
    from divae.vq import VQConfig

    tiny_vq = VQConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=16, z_channels=8,
                       norm_groups=4, embed_dim=4, n_embed=16)
    model = DiVAE(tiny_vq)
    state = model.state_dict()
    vq = sub_state(state, "vq")
    assert vq.keys() == model.vq.state_dict().keys() and all(vq[k] is state[f"vq.{k}"] for k in vq)
    assert sub_state({"vqx.a": 1, "vq.b": 2, "unet.vq.c": 3}, "vq") == {"b": 2}  # the whole first name only
