"""evaluation.floors (the equal-bits thumbnail floor) and the standard errors the evaluation reports."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from eval_fixtures import BlurNoiseReconstruct, make_dataset, run_eval  # tests/ is on sys.path under pytest

from evaluation.floors import equal_bits_floor, equal_bits_side, thumbnail_reconstruction, token_bits
from evaluation.metrics import psnr


def test_equal_bits_side_is_the_largest_thumbnail_within_the_token_bits():
    assert token_bits((16, 16), 512) == 2304 and token_bits((8, 8), 512) == 576
    assert equal_bits_side(2304) == 9  # 9x9x24 = 1944 <= 2304 < 10x10x24 = 2400
    assert equal_bits_side(576) == 4  # 384 <= 576 < 600
    assert equal_bits_side(2400) == 10
    with pytest.raises(ValueError, match="1x1"):
        equal_bits_side(23)


def test_thumbnail_floor_rises_with_its_bits_and_is_exact_on_flat_images():
    images = torch.from_numpy(np.stack(make_dataset(8))).permute(0, 3, 1, 2).contiguous()
    figures = [equal_bits_floor(images, 24 * s * s)["psnr"] for s in (2, 4, 8, 16)]
    assert figures == sorted(figures) and figures[-1] - figures[0] > 5  # more bits, a better thumbnail
    flat = torch.full((2, 3, 64, 64), 77, dtype=torch.uint8)
    assert torch.equal(thumbnail_reconstruction(flat, 4), flat)
    # the thumbnail is 8-bit: PSNR of a side-s floor equals the PSNR of the image rebuilt from its rounded pixels
    rec = thumbnail_reconstruction(images, 9)
    assert rec.dtype == torch.uint8 and rec.shape == images.shape
    assert math.isclose(equal_bits_floor(images, 2304)["psnr"], float(psnr(images, rec).mean()), rel_tol=1e-12)
    with pytest.raises(ValueError, match="uint8"):
        thumbnail_reconstruction(images.float(), 4)


def test_evaluation_reports_the_standard_error_of_each_mean(tmp_path):
    res = run_eval(tmp_path / "e", batch_size=3, save_every=0)
    images = torch.from_numpy(np.stack(make_dataset())).permute(0, 3, 1, 2).contiguous()
    recon, _ = BlurNoiseReconstruct()(images, torch.arange(len(images)))
    per_image = psnr(images, recon).numpy()
    assert math.isclose(res["psnr"], per_image.mean(), rel_tol=1e-9)
    assert math.isclose(res["psnr_sem"], per_image.std(ddof=1) / math.sqrt(len(per_image)), rel_tol=1e-6)
    assert res["ssim_sem"] > 0
