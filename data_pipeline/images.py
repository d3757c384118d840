"""Image decode -> RGB -> shorter side to `size` -> center crop -> JPEG, with a reason for every rejection.

`preprocess(data, cfg)` is the single place where a raw file becomes a training image. It never drops a
decodable image: anything PIL can decode (any mode, any size) comes out as a `size` x `size` RGB JPEG.
Inputs that cannot be decoded raise `SkipImage(reason)`; the reasons are short fixed strings so that the
manifest can count them.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import asdict, dataclass
from struct import error as struct_error  # raised by some PIL plugins on garbage headers
from typing import Literal, get_args

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Reasons recorded in manifests (keep stable: tests and users grep for them).
EMPTY = "empty file"
NOT_IMAGE = "not an image"
TRUNCATED = "truncated image"
CORRUPT = "corrupt image"
BOMB = "decompression bomb"
TOO_SMALL = "too small"

Resample = Literal["bicubic", "lanczos", "bilinear"]
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
             "bilinear": Image.Resampling.BILINEAR}
RESAMPLES = get_args(Resample)


class SkipImage(Exception):
    """Raised for an input that is not a usable image; `reason` is one of the module constants."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ImageConfig:
    """How every image is turned into a training image (recorded verbatim in the manifest)."""

    size: int = 256  # output is size x size
    jpeg_quality: int = 95
    draft: bool = True  # let libjpeg decode large JPEGs at 1/2, 1/4, 1/8 scale (never below `size`)
    resample: Resample = "bicubic"  # antialiasing filter for the final resize
    max_pixels: int = 178_956_970  # larger headers are rejected as decompression bombs (PIL's limit)
    min_size: int = 0  # reject sources whose shorter side is below this (0: keep all)

    def __post_init__(self):
        if self.size < 8:
            raise ValueError(f"size must be >= 8, got {self.size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.resample not in RESAMPLES:
            raise ValueError(f"resample must be one of {RESAMPLES}, got {self.resample!r}")

    def describe(self) -> dict:
        d = asdict(self)
        d.update(mode="RGB", crop="center", exif_transpose=True, alpha="composited on white",
                 resize="shorter side to size then center crop, one antialiased resample of the crop box",
                 jpeg_subsampling="4:2:0", pillow=Image.__version__)
        return d


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is composited on white; 16/32-bit grey is scaled, not clipped."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def decode(data: bytes, cfg: ImageConfig, target: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> (RGB image, original (W, H) after EXIF orientation). Draft-decodes JPEGs toward `target`.

    Raises SkipImage for empty, non-image, truncated, corrupt or oversized inputs.
    """
    if not data:
        raise SkipImage(EMPTY)
    if Image.MAX_IMAGE_PIXELS is not None and cfg.max_pixels > Image.MAX_IMAGE_PIXELS:
        # cfg.max_pixels is the limit (checked below); PIL's own, lower one would refuse at open(). Only ever
        # raised, never lowered, so code sharing this process keeps at least the protection it had.
        Image.MAX_IMAGE_PIXELS = cfg.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > cfg.max_pixels:
                raise SkipImage(BOMB, f"{w}x{h} exceeds max_pixels={cfg.max_pixels}")
            if w < 1 or h < 1:
                raise SkipImage(CORRUPT, f"size {w}x{h}")
            orientation = im.getexif().get(0x0112, 1)
            orig = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
            if min(orig) < cfg.min_size:
                raise SkipImage(TOO_SMALL, f"{orig[0]}x{orig[1]} < min_size={cfg.min_size}")
            if cfg.draft and target and im.format == "JPEG":
                # libjpeg DCT scaling keeps both sides >= target, so the shorter side stays >= target.
                im.draft("RGB", (target, target))
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
    except SkipImage:
        raise
    except UnidentifiedImageError:
        raise SkipImage(NOT_IMAGE, "PIL cannot identify the format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipImage(BOMB, str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct_error) as e:
        msg = re.sub(r" at 0x[0-9a-fA-F]+", "", str(e))  # no object addresses: manifests must be reproducible
        reason = TRUNCATED if ("truncated" in msg or "end of file" in msg.lower()) else CORRUPT
        raise SkipImage(reason, msg) from None
    return im, orig


def center_crop_resize(im: Image.Image, size: int, resample: Resample = "bicubic") -> Image.Image:
    """Shorter side to `size`, center crop to size x size, in one antialiased resample of the crop box."""
    w, h = im.size
    s = min(w, h)
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    if (w, h) == (size, size):
        return im
    return im.resize((size, size), _RESAMPLE[resample], box=box, reducing_gap=None)


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def preprocess(data: bytes, cfg: ImageConfig) -> tuple[bytes, tuple[int, int]]:
    """Raw file bytes -> (JPEG bytes of a cfg.size x cfg.size RGB image, original (W, H))."""
    im, orig = decode(data, cfg, target=cfg.size)
    out = center_crop_resize(im, cfg.size, cfg.resample)
    return encode_jpeg(out, cfg.jpeg_quality), orig


def decode_rgb_array(data: bytes) -> np.ndarray:
    """Stored shard JPEG -> uint8 array (H, W, 3). For the loaders and the reader (trusted shard data)."""
    im = Image.open(io.BytesIO(data))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


assert not ImageFile.LOAD_TRUNCATED_IMAGES, "truncated images must raise, not load half-grey"


def save_grid(rows: list, path: str | os.PathLike, pad: int = 2) -> None:
    """The one PNG grid writer (training samples, evaluation samples): rows of uint8 images (n, 3, H, W)
    (CPU tensors or arrays), e.g. originals above reconstructions, on a white canvas with `pad` pixels between."""
    arrays = [np.asarray(r) for r in rows]
    n = max(a.shape[0] for a in arrays)
    h, w = arrays[0].shape[-2:]
    canvas = np.full((len(arrays) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(arrays):
        for c, img in enumerate(row):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y:y + h, x:x + w] = img.transpose(1, 2, 0)
    Image.fromarray(canvas).save(path)
