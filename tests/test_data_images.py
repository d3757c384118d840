"""Image handling: every valid mode/format becomes a size x size RGB JPEG, every bad input a reason."""

import io

import numpy as np
import pytest
from data_fixtures import bad_inputs, encode, grey_photo, photos
from PIL import Image

from data_pipeline.images import ImageConfig, SkipImage, preprocess


@pytest.mark.parametrize("name", sorted(bad_inputs()))
def test_bad_and_odd_inputs(name):
    data, reason = bad_inputs()[name]
    cfg = ImageConfig(size=64)
    if reason is None:
        jpg, (w, h) = preprocess(data, cfg)
        im = Image.open(io.BytesIO(jpg))
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 64))
        assert w > 64 and h > 64
    else:
        with pytest.raises(SkipImage) as e:
            preprocess(data, cfg)
        assert e.value.reason == reason


def test_exif_orientation_swaps_size_and_rotates():
    data, _ = bad_inputs()["ok_exif_rotated.JPEG"]
    jpg, orig = preprocess(data, ImageConfig(size=64, draft=False))
    assert orig == (427, 640)  # stored 640x427 landscape, displayed portrait
    rot = np.asarray(Image.fromarray(photos()[3]).rotate(-90, expand=True).resize((64, 96)))[16:80]
    out = np.asarray(Image.open(io.BytesIO(jpg))).astype(float)
    assert np.abs(out - rot).mean() < 12  # same content as the rotated photo, not the stored one


def test_16bit_grey_is_scaled_not_clipped_and_alpha_on_white():
    g = grey_photo()
    a, _ = preprocess(bad_inputs()["ok_grey16.JPEG"][0], ImageConfig(size=64))
    b, _ = preprocess(encode(g, "PNG"), ImageConfig(size=64))
    ma, mb = (np.asarray(Image.open(io.BytesIO(x))).astype(float).mean() for x in (a, b))
    assert abs(ma - mb) < 2 and mb < 200  # clipping would give ~255 everywhere
    rgba = np.zeros((40, 40, 4), np.uint8)  # fully transparent black -> white
    c, _ = preprocess(encode(rgba, "PNG"), ImageConfig(size=32))
    assert np.asarray(Image.open(io.BytesIO(c))).min() > 240


def test_center_crop_draft_close_to_full_decode():
    big = np.asarray(Image.fromarray(photos()[0]).resize((1600, 1200)))
    data = encode(big, quality=95)
    a, size_a = preprocess(data, ImageConfig(size=128, draft=True))
    b, size_b = preprocess(data, ImageConfig(size=128, draft=False))
    assert size_a == size_b == (1600, 1200)
    da, db = (np.asarray(Image.open(io.BytesIO(x))).astype(float) for x in (a, b))
    assert np.abs(da - db).mean() < 4  # draft decode + antialiased resize ~ full decode
    assert not np.array_equal(da, db)


def test_min_size_filter_and_upscale_small():
    small = encode(photos()[1][:40, :50])
    with pytest.raises(SkipImage) as e:
        preprocess(small, ImageConfig(size=64, min_size=48))
    assert e.value.reason == "too small"
    jpg, orig = preprocess(small, ImageConfig(size=64))  # kept and upscaled when no min_size
    assert orig == (50, 40) and Image.open(io.BytesIO(jpg)).size == (64, 64)
