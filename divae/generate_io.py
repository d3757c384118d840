"""The files of `python -m divae.generate`: PNGs that carry how they were made, token grids, the grid image.

Each PNG holds three text chunks: `caption`, `seed` (decimal) and `divae`, a JSON object
`{"image": {...what makes this image: caption, seed, ...}, "settings": {...the run's sampling settings...}}`;
`read_meta` gives that object back, and a rerun skips a PNG whose object equals the one it would write.
Token grids are `.npy` files of one (h, w) integer array (int16, or int32 for codebooks over 32,767 codes),
written and read with allow_pickle=False (`token_jobs` reads a folder of them for --from-tokens). Every file is
written beside its place and renamed into it, so a kill leaves the old file or the new one.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from divae.utils.cli import UsageError
from divae.utils.files import atomic_file, sha256_file

META_KEY = "divae"  # the PNG text chunk with the JSON object
TOKENS_SUFFIX = ".tokens.npy"


@dataclass
class Job:
    """One image to have in --out: its file name, what makes it (`image`: caption, seed, ...) and, with
    --from-tokens, its token grid (h, w)."""

    name: str
    image: dict
    tokens: np.ndarray | None = field(default=None, repr=False)


def slug(text: str, n: int = 40) -> str:
    """`text` as at most n lowercase ASCII letters, digits and dashes ("caption" when nothing is left)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "caption"


def image_name(caption_number: int, caption: str, seed: int) -> str:
    """The PNG name of (caption number, caption, seed): `0003_a-red-square_seed7.png`."""
    return f"{caption_number:04d}_{slug(caption)}_seed{seed}.png"


def tokens_name(png_name: str) -> str:
    """The token file beside a PNG: `x.png` -> `x.tokens.npy`."""
    return png_name.removesuffix(".png") + TOKENS_SUFFIX


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] (any float dtype, any device) -> (B, H, W, 3) uint8 on the CPU."""
    return ((x.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_png(path: Path, img: np.ndarray, meta: dict[str, Any]) -> None:
    """Write img (H, W, 3) uint8 as a PNG with text chunks `caption`, `seed` and `divae` (json.dumps(meta));
    meta["image"] holds the caption (None: none) and the seed."""
    info = PngImagePlugin.PngInfo()
    caption = meta["image"].get("caption")
    info.add_text("caption", "" if caption is None else caption)  # iTXt (UTF-8) when not Latin-1
    info.add_text("seed", str(meta["image"]["seed"]))
    info.add_text(META_KEY, json.dumps(meta, ensure_ascii=False, sort_keys=True))
    with atomic_file(path) as f:
        Image.fromarray(img).save(f, format="PNG", pnginfo=info)


def read_meta(path: Path) -> dict[str, Any] | None:
    """The `divae` JSON object of a PNG this module wrote; None for any other file (unreadable, not a PNG, no
    such chunk, not a JSON object)."""
    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}).get(META_KEY)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    try:
        meta = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def meta_difference(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """A short account of how `old` (read_meta's object) differs from `new`, e.g. "guidance_scale 2.0 -> 3.0";
    "" when they are equal."""
    if old is None:
        return "it carries no divae metadata"
    diffs = []
    for part in ("image", "settings"):
        a, b = old.get(part) or {}, new[part]
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                diffs.append(f"{k} {a.get(k)!r} -> {b.get(k)!r}")
    return ", ".join(diffs[:3]) + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "")


def save_tokens(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Write one token grid (h, w) as .npy: int16 when vocab_size <= 32767 codes, else int32; no pickle."""
    dtype = np.int16 if vocab_size <= np.iinfo(np.int16).max else np.int32
    with atomic_file(path) as f:
        np.save(f, np.asarray(tokens).astype(dtype), allow_pickle=False)


def load_tokens(path: Path, vocab_size: int) -> np.ndarray:
    """One token grid (h, w) int64 from a .npy file, loaded without unpickling; a one-line UsageError for a file
    that is not one: not .npy, an object or non-integer array, not 2-D, codes outside [0, vocab_size), a header
    whose shape the file does not hold."""
    try:  # mapped, not read: a header that claims more than the file holds is refused before any allocation
        z = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # object arrays need pickle; also damaged headers and shapes beyond the file
        raise UsageError(f"{path}: not a token grid ({str(e).splitlines()[0]})") from None
    except (OSError, EOFError) as e:
        raise UsageError(f"{path}: cannot read it as .npy ({e})") from None
    if not isinstance(z, np.ndarray) or not np.issubdtype(z.dtype, np.integer):
        raise UsageError(f"{path}: token grids hold integer codes, this array is {getattr(z, 'dtype', type(z))}")
    if z.ndim != 2 or 0 in z.shape:
        raise UsageError(f"{path}: a token grid is one (h, w) array, this one is shaped {z.shape}")
    if int(z.min()) < 0 or int(z.max()) >= vocab_size:
        raise UsageError(f"{path}: codes lie in [{int(z.min())}, {int(z.max())}] but the codebook has "
                         f"{vocab_size} (the tokens of another VQ?)")
    return np.array(z, dtype=np.int64)


def write_grid(path: Path, files: list[Path], columns: int) -> tuple[int, int]:
    """Tile the PNGs `files` (all H x W) row by row, `columns` per row, into one PNG at `path` (black where the
    last row is short). Returns (rows, columns)."""
    tiles = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    h, w, _ = tiles[0].shape
    if any(t.shape != tiles[0].shape for t in tiles):
        raise ValueError(f"the grid's images differ in size: {sorted({t.shape for t in tiles})}")
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    grid = np.zeros((rows * h, columns * w, 3), np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = t
    with atomic_file(path) as f:
        Image.fromarray(grid).save(f, format="PNG")
    return rows, columns


def token_jobs(folder: Path, vocab: int, first_seed: int) -> list[Job]:
    """A job per `*.tokens.npy` of `folder` (name order), its caption and seed from folder/index.json when that
    lists the file, else no caption and seed first_seed + its place; all grids must share one shape."""
    files = sorted(folder.glob("*" + TOKENS_SUFFIX))
    if not files:
        raise UsageError(f"--from-tokens {folder} holds no *{TOKENS_SUFFIX} files (made by --save-tokens)")
    listed = {}
    if (folder / "index.json").exists():
        try:
            images = json.loads((folder / "index.json").read_text(encoding="utf-8")).get("images", [])
            listed = {e["tokens"]: e for e in images if isinstance(e, dict) and "tokens" in e}
        except (ValueError, AttributeError, TypeError) as e:
            raise UsageError(f"--from-tokens {folder}/index.json is not generate's index ({e})") from None
    jobs = []
    for k, f in enumerate(files):
        z = load_tokens(f, vocab)
        if jobs and z.shape != jobs[0].tokens.shape:
            raise UsageError(f"{f}: token grid {z.shape} differs from {files[0].name}'s {jobs[0].tokens.shape}; "
                             "decode grids of one shape per run")
        entry = listed.get(f.name, {})
        seed = entry.get("seed", first_seed + k)
        if not isinstance(seed, int):
            raise UsageError(f"--from-tokens {folder}/index.json gives {f.name} the seed {seed!r}, not an integer")
        image = {"caption": entry.get("caption"), "seed": seed, "tokens_sha256": sha256_file(f)}
        jobs.append(Job(f.name.removesuffix(TOKENS_SUFFIX) + ".png", image, z))
    return jobs
