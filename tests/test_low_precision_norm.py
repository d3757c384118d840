"""LowPrecisionGroupNorm (issue 25, item 6): GroupNorm in bf16 with float32 statistics, measured against the
float32 norm under the bf16 autocast the trainer uses, with bf16 weights as the DeepSpeed bf16 engine holds."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from model_fixtures import randomized  # tests/ is on sys.path (rootdir conftest)

from divae.unet import UNetConfig
from divae.unet_blocks import EdgeGroupNorm, LowPrecisionGroupNorm


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).norm() / ref.norm()).item()


def _norm_and_input(low: bool) -> tuple[LowPrecisionGroupNorm, torch.Tensor]:
    torch.manual_seed(0)
    norm = LowPrecisionGroupNorm(32, 256)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.1)
    norm.low_precision = low
    x = (torch.randn(4, 256, 32, 32) * 0.5 + 2.0).bfloat16()  # activations whose mean is 4x their spread
    return norm.bfloat16(), x


def test_bf16_group_norm_with_fp32_statistics_is_as_close_as_rounding_allows():
    norm, x = _norm_and_input(True)
    w, b = norm.weight.float(), norm.bias.float()
    ref = F.group_norm(x.float(), 32, w, b, norm.eps)  # what CUDA autocast computes (fp32 list)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16
    floor = _rel(ref.bfloat16(), ref)  # rounding the float32 result to bf16, as the next bf16 layer does
    xs = x.view(4, 32, -1)  # statistics in bf16 arithmetic: what fp32 statistics avoid
    m = xs.mean(-1, keepdim=True)
    naive = ((xs - m) * ((xs - m).square().mean(-1, keepdim=True) + norm.eps).rsqrt()).view_as(x)
    naive = naive * norm.weight[:, None, None] + norm.bias[:, None, None]
    err, naive_err = _rel(out, ref), _rel(naive, ref)
    msg = f"relative error: bf16 norm {err:.2e}, bf16 rounding of the fp32 norm {floor:.2e}, bf16 stats {naive_err:.2e}"
    print(msg)
    assert err < 2 * floor and err < naive_err / 2, msg


def test_gradients_match_the_fp32_norm_and_off_is_the_plain_group_norm():
    norm, x = _norm_and_input(True)
    ref_norm = torch.nn.GroupNorm(32, 256)
    ref_norm.load_state_dict({k: v.float() for k, v in norm.state_dict().items()})
    xr, xl = x.float().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(x.shape)
    ref_norm(xr).backward(g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norm(xl).float().backward(g)
    assert xl.grad.dtype == torch.bfloat16 and _rel(xl.grad, xr.grad) < 0.01
    assert _rel(norm.weight.grad, ref_norm.weight.grad) < 0.01
    off, _ = _norm_and_input(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(off(x), torch.nn.GroupNorm.forward(off, x))


def test_unet_switch_reaches_the_block_norms_only():
    cfg = UNetConfig(image_size=32, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(16,), num_head_channels=32, cond_channels=8, token_grid=8)
    on, off = randomized(replace(cfg, bf16_norms=True)), randomized(cfg)
    assert on.state_dict().keys() == off.state_dict().keys()
    norms = [m for m in on.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(m.low_precision for m in norms if not isinstance(m, EdgeGroupNorm))
    assert not any(getattr(m, "low_precision", False) for m in off.modules())
    g = torch.Generator().manual_seed(1)
    x, t, c = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([10, 900]), torch.randn(2, 8, 8, 8, generator=g)
    ref = off(x, t, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = on(x, t, c)
    assert _rel(out, ref) < 0.05
