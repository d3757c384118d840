"""Datasets for `python -m evaluation.recon_fid --data`: val shards, or a plain folder of images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image


class ImageFolderDataset:
    """Images in a folder (sorted by name), preprocessed as the shards are: shorter side to `size` with an
    antialiasing filter, centre crop to size x size, RGB. For quick evaluations without shards."""

    EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}

    def __init__(self, root: str | os.PathLike, size: int = 256):
        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in self.EXTS)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(self.EXTS))}) under {root}")
        self.size = size
        self.manifest = {"source": str(root), "size": size,
                         "files": [[str(p.relative_to(root)), p.stat().st_size] for p in self.files]}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        with Image.open(self.files[i]) as im:
            im = im.convert("RGB")
            s = self.size / min(im.size)
            im = im.resize((max(self.size, round(im.width * s)), max(self.size, round(im.height * s))),
                           Image.Resampling.BICUBIC, reducing_gap=None)
            left, top = (im.width - self.size) // 2, (im.height - self.size) // 2
            return np.asarray(im.crop((left, top, left + self.size, top + self.size)))


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
