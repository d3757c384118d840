"""Datasets for `python -m evaluation.recon_fid --data`: val shards, or a plain folder of images (preprocessed by
the shards' own code, data_pipeline.images)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from data_pipeline.images import ImageConfig, SkipImage, decode_rgb_array, preprocess
from data_pipeline.sources import list_images


class ImageFolderDataset:
    """The images under a folder (recursive, in the order and with the rules of `prepare_folder`), each one
    turned by the shards' own code (`data_pipeline.images.preprocess`: EXIF rotation, any mode to RGB with
    alpha composited on white, shorter side to `size` with an antialiasing filter, centre crop, JPEG q95) and
    decoded: item i is exactly the image a shard prepared from this folder holds. For quick evaluations
    without shards.

    A file that is not a usable image (truncated, empty, not an image, a decompression bomb) raises
    `SkipImage` whose detail starts with the file's path; `evaluate_reconstructions` skips and lists it.
    """

    def __init__(self, root: str | os.PathLike, size: int = 256, cfg: ImageConfig | None = None):
        self.root = Path(root)
        self.cfg = cfg or ImageConfig(size=size)
        self.rels = list_images(str(root))
        if not self.rels:
            raise FileNotFoundError(f"no image files under {root}")
        self.files = [self.root / r for r in self.rels]
        self.size = self.cfg.size
        self.manifest = {"source": str(root), "size": self.cfg.size, "preprocessing": self.cfg.describe(),
                         "files": [[_printable(r), p.stat().st_size] for r, p in zip(self.rels, self.files)]}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        try:
            jpg, _ = preprocess(self.files[i].read_bytes(), self.cfg)
        except SkipImage as e:
            raise SkipImage(e.reason, f"{_printable(self.rels[i])}" + (f" ({e.detail})" if e.detail else "")) from None
        except OSError as e:  # unreadable file
            raise SkipImage("unreadable file", f"{_printable(self.rels[i])} ({e.strerror or e})") from None
        return decode_rgb_array(jpg)


def _printable(name: str) -> str:
    """A file name as valid UTF-8 text (undecodable bytes shown as U+FFFD)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def open_dataset(path: str | os.PathLike, image_size: int = 256):
    """Val shards (a folder with manifest.json, read by data_pipeline.reader.ShardReader) or a folder of
    images. The returned object has `.manifest` (dict or JSON text)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    if (path / "manifest.json").is_file():
        from data_pipeline.reader import ShardReader

        return ShardReader(str(path))
    return ImageFolderDataset(path, image_size)


def manifest_bytes(dataset) -> bytes:
    m = getattr(dataset, "manifest", None)
    if m is None:
        raise ValueError("the dataset has no manifest; pass --ref-stats-dir '' to skip reference caching")
    return m if isinstance(m, bytes) else (m if isinstance(m, str) else json.dumps(m, sort_keys=True)).encode()
