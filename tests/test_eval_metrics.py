"""evaluation.metrics: PSNR/SSIM on uint8 with data range 255, codebook usage and perplexity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from evaluation.metrics import CodebookCounter, psnr, ssim, to_uint8, to_unit_range


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.from_numpy(skdata.astronaut()[::4, ::4].copy()).permute(2, 0, 1)  # (3, 128, 128)
    a = torch.stack([img, img.flip(-1)])
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(-12, 13, a.shape, generator=g)
    return a, (a.int() + noise).clamp(0, 255).byte()


def test_psnr_matches_skimage(pair):
    a, b = pair
    got = psnr(a, b)
    for k in range(2):
        ref = peak_signal_noise_ratio(a[k].numpy(), b[k].numpy(), data_range=255)
        assert got[k].item() == pytest.approx(ref, rel=1e-12)
    assert 25 < got[0] < 40
    assert math.isinf(psnr(a, a)[0].item())


def test_ssim_data_range_is_right(pair):
    a, b = pair
    got = ssim(a, b)
    # the same figure from float images in [0, 1] with data_range=1: the data range is handled, not ignored
    for k in range(2):
        x = a[k].permute(1, 2, 0).numpy() / 255.0
        y = b[k].permute(1, 2, 0).numpy() / 255.0
        ref = structural_similarity(x, y, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert got[k].item() == pytest.approx(ref, rel=1e-9)
    assert 0.5 < got.min() < 0.99
    np.testing.assert_allclose(ssim(a, a).numpy(), 1.0)
    blurred = torch.nn.functional.avg_pool2d(a.float(), 5, 1, 2).round().byte()
    assert (ssim(a, blurred) < 0.95).all()


def test_metrics_refuse_floats(pair):
    a, _ = pair
    with pytest.raises(ValueError, match="uint8"):
        psnr(a, a.float())


def test_unit_range_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    u = to_unit_range(x)
    assert u.min() == -1 and u.max() == 1
    assert torch.equal(to_uint8(u), x)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))


def test_codebook_usage_and_perplexity():
    c = CodebookCounter(8)
    c.update(torch.tensor([[0, 1], [2, 3]]))  # 4 codes used once each
    s = c.summary()
    assert s["codes_used"] == 4 and s["usage"] == 0.5 and s["perplexity"] == pytest.approx(4.0)
    c.update(torch.zeros(2, 2, dtype=torch.long))  # code 0 now 5/8 of the mass
    p = np.array([5, 1, 1, 1]) / 8
    assert c.summary()["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    with pytest.raises(ValueError, match="out of range"):
        c.update(torch.tensor([8]))


def test_device_ssim_equals_scikit_image_on_photos():
    """`ssim` (torch, float64, on the images' device) against scikit-image itself: real photos, a square and
    a non-square size, noise, blur and a shift; also inside a bf16 autocast region (the sampling precision)."""
    from evaluation.metrics import ssim_skimage

    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    g = torch.Generator().manual_seed(1)
    for h, w in [(64, 64), (45, 71)]:
        a = torch.stack([torch.from_numpy(np.ascontiguousarray(p[:h * 2:2, :w * 2:2, :3])).permute(2, 0, 1)
                         for p in photos])
        noisy = (a.int() + torch.randint(-30, 31, a.shape, generator=g)).clamp(0, 255).byte()
        blurred = torch.nn.functional.avg_pool2d(a.float(), 3, 1, 1).round().byte()
        for b in (noisy, blurred, a.roll(2, -1)):
            ref = ssim_skimage(a, b)
            got = ssim(a, b)
            assert got.dtype == torch.float64 and got.shape == (4,)
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
            assert (got - ref).abs().max() < 1e-9  # in fact equal to float64 rounding
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert torch.equal(ssim(a, b), got)
    with pytest.raises(ValueError, match="at least 11"):
        ssim(a[..., :10, :10], a[..., :10, :10])
