"""CUDA paths of the UNet and samplers: SDPA flash / memory-efficient kernels, bf16 autocast, xformers,
device-independent per-sample noise. The tests marked `gpu` are deselected on machines without CUDA (see
conftest.py); the output-dtype rule runs on CPU too (CPU autocast follows it alike), and the xformers case is
skipped, with the reason, where xformers is not installed (the project does not install it: pyproject.toml).

Output dtype under bf16 autocast: with `unet.fp32_edges` (the default) the output layer runs in float32, so the
model returns float32; without them it returns bfloat16 (bench/gpu_check.sh runs this file first).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from model_fixtures import randomized  # tests/ is on sys.path (rootdir conftest)
from torch.nn.attention import SDPBackend, sdpa_kernel

from divae.attention import xformers_available
from divae.diffusion import DiffusionConfig, create_diffusion, sample
from divae.unet import UNET_PRESETS, UNetConfig, UNetModel

SMALL = UNetConfig(image_size=32, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                   attention_resolutions=(16, 8), num_head_channels=32, cond_channels=8, token_grid=8)


def _inputs(device, b=4, hw=32, grid=8, d=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 3, hw, hw, generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    cond = torch.randn(b, d, grid, grid, generator=g).to(device)
    return x, t, cond


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _edge_dtype(fp32_edges: bool) -> torch.dtype:
    """The UNet's output dtype under bf16 autocast: float32 with fp32 output edges, else bfloat16."""
    return torch.float32 if fp32_edges else torch.bfloat16


@pytest.mark.parametrize("fp32_edges", [True, False])
def test_bf16_autocast_output_dtype_follows_the_fp32_edges_on_cpu(fp32_edges):
    model = randomized(replace(SMALL, cond_method="attention", attn_backend="sdpa", fp32_edges=fp32_edges))
    x, t, cond = _inputs("cpu")
    ref = model(x, t, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, cond)
    assert out.dtype == _edge_dtype(fp32_edges)
    assert (out.float() - ref).norm() / ref.norm() < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["concat", "add", "attention"])
def test_cuda_fp32_matches_cpu(method):
    model = randomized(replace(SMALL, cond_method=method))
    x, t, cond = _inputs("cpu")
    ref = model(x, t, cond)
    out = model.cuda()(x.cuda(), t.cuda(), cond.cuda()).cpu()
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
def test_bf16_autocast_with_flash_and_memory_efficient_kernels(backend):
    model = randomized(replace(SMALL, cond_method="attention", attn_backend="sdpa")).cuda()
    x, t, cond = _inputs("cuda")
    ref = model(x, t, cond)
    cond.requires_grad_(True)
    with sdpa_kernel([backend]), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, t, cond)
        assert out.dtype == _edge_dtype(SMALL.fp32_edges)  # fp32 output edges by default: float32
        out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 0.05
    assert cond.grad.abs().sum() > 0


@pytest.mark.gpu
def test_xformers_backend_matches_sdpa():
    if not xformers_available():
        pytest.skip("xformers is not installed (the project does not install it, pyproject.toml): install an "
                    "xformers build made for this torch (docs/training.md, Installation) to test attn_backend=xformers")
    x, t, cond = _inputs("cuda")
    outs = []
    for backend in ("sdpa", "xformers"):
        model = randomized(replace(SMALL, cond_method="attention", attn_backend=backend)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs.append(model(x, t, cond).float())
    assert (outs[0] - outs[1]).norm() / outs[0].norm() < 0.02


@pytest.mark.gpu
def test_seeded_sampling_is_the_same_on_cpu_and_cuda():
    model = randomized(SMALL)
    cfg = DiffusionConfig()
    _, _, cond = _inputs("cpu", b=2)
    kw = dict(sampler="ddim", steps=5, eta=1.0, seeds=[3, 4])
    cpu = sample(model, cfg, (2, 3, 32, 32), model_kwargs={"cond": cond}, **kw)
    gpu = sample(model.cuda(), cfg, (2, 3, 32, 32), model_kwargs={"cond": cond.cuda()}, **kw)
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-3, rtol=0)


@pytest.mark.gpu
def test_decoder_f16_bf16_train_step_with_checkpointing_and_channels_last():
    cfg = replace(UNET_PRESETS["decoder_f16"], use_checkpoint=True)
    model = UNetModel(cfg).cuda().to(memory_format=torch.channels_last).train()
    diffusion = create_diffusion(DiffusionConfig())
    x0 = (torch.rand(2, 3, 256, 256, device="cuda") * 2 - 1).to(memory_format=torch.channels_last)
    z = torch.randn(2, 256, 16, 16, device="cuda")
    t = torch.tensor([5, 900], device="cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = diffusion.training_losses(model, x0, t, model_kwargs={"cond": z})
    losses["loss"].mean().backward()
    assert torch.isfinite(losses["loss"]).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # non-square decode at paper scale: 16x24 tokens -> 256x384
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 256, 384, device="cuda"), torch.tensor([500], device="cuda"),
                    torch.randn(1, 256, 16, 24, device="cuda"))
    assert out.shape == (1, 6, 256, 384)
