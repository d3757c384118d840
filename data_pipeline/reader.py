"""Random access to a prepared shard folder by global sample index (for evaluation and tools).

`ShardReader(path)[i]` is the i-th sample of the folder in manifest order, independent of rank and world
size, so evaluation can give each rank the indices `range(rank, len(reader), world_size)`.

Opening checks every shard's size against the manifest (and its sha256 with `verify=True`); a sample that
cannot be read or decoded raises `data_pipeline.integrity.ShardError` naming the shard file and the sample's key.
"""

from __future__ import annotations

import bisect
import os
import tarfile
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from data_pipeline.images import decode_rgb_array
from data_pipeline.integrity import check_shards, sample_error
from data_pipeline.shards import ShardWriter, decode_mds_sample, decode_wds_value, load_manifest


class ShardReader:
    """Read samples of an MDS or webdataset shard folder written by this package.

    `reader[i]` -> dict with every stored column (jpg bytes, label int, caption str, key str,
    orig_size str "WxH", extras) plus "image": uint8 numpy array (H, W, 3) decoded from jpg, and
    "index": i. `len(reader)` is the sample count; `reader.manifest` is the parsed manifest.json.
    Opens files lazily, so a reader can be pickled into DataLoader workers.
    """

    def __init__(self, path: str, decode_image: bool = True, verify: bool = False):
        self.path = path
        self.manifest = load_manifest(path)
        self.format = self.manifest["format"]
        self.columns = self.manifest["columns"]
        self.decode_image = decode_image
        self._shards = [s["basename"] for s in self.manifest["shards"]]
        counts = [s["samples"] for s in self.manifest["shards"]]
        self._starts = list(np.cumsum([0] + counts[:-1]).tolist())
        self._len = int(sum(counts))
        check_shards(path, self.manifest, sha256=verify)  # sizes always; sha256 with verify=True
        self._mds_layout = None
        if self.format == "mds":
            names = sorted(self.columns)
            self._mds_layout = (names, [self.columns[n] for n in names])
        self._tar_index: dict[int, list[dict[str, tuple[int, int]]]] = {}

    def __len__(self) -> int:
        return self._len

    def _locate(self, i: int) -> tuple[int, int]:
        if not -self._len <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} samples")
        i %= self._len
        shard = bisect.bisect_right(self._starts, i) - 1
        return shard, i - self._starts[shard]

    def _read_mds(self, shard: int, pos: int) -> dict:
        names, encs = self._mds_layout
        with open(os.path.join(self.path, self._shards[shard]), "rb", 0) as f:
            f.seek(4 + 4 * pos)
            begin, end = np.frombuffer(f.read(8), np.uint32)
            f.seek(int(begin))
            data = f.read(int(end - begin))
        return decode_mds_sample(data, names, encs)

    def _members(self, shard: int) -> list[dict[str, tuple[int, int]]]:
        if shard not in self._tar_index:
            samples: dict[str, dict[str, tuple[int, int]]] = {}
            with tarfile.open(os.path.join(self.path, self._shards[shard]), "r:") as tf:
                for m in tf:
                    prefix, _, col = m.name.partition(".")
                    samples.setdefault(prefix, {})[col] = (m.offset_data, m.size)
            self._tar_index[shard] = [samples[k] for k in sorted(samples)]
        return self._tar_index[shard]

    def _read_wds(self, shard: int, pos: int) -> dict:
        cols = self._members(shard)[pos]
        out = {}
        with open(os.path.join(self.path, self._shards[shard]), "rb", 0) as f:
            for name, enc in self.columns.items():
                off, size = cols[name]
                f.seek(off)
                out[name] = decode_wds_value(f.read(size), enc)
        return out

    def __getitem__(self, i: int) -> dict:
        shard, pos = self._locate(int(i))
        s = None
        try:
            s = self._read_mds(shard, pos) if self.format == "mds" else self._read_wds(shard, pos)
            if self.decode_image:
                s["image"] = decode_rgb_array(s["jpg"])
        except Exception as e:  # noqa: BLE001 - any failure on stored bytes is damage: name where it is
            key = s.get("key") if isinstance(s, dict) else None
            raise sample_error(os.path.join(self.path, self._shards[shard]), int(i) % self._len, key, e) from e
        s["index"] = int(i) % self._len
        return s


def copy_with_extra_column(src: str, dst: str, fn: Callable[[list[dict]], Iterable[Any]], name: str,
                           encoding: str = "bytes", batch_size: int = 64, fmt: str | None = None,
                           shard_size: int | None = None) -> dict:
    """Copy the dataset at `src` to `dst` (same order) adding column `name` computed by `fn`.

    `fn(samples) -> values` gets a list of up to `batch_size` decoded samples (ShardReader dicts: "image" is
    uint8 (H, W, 3) numpy, plus every stored column, "jpg" included) and returns one value per sample, in
    the column's MDS encoding (e.g. `tokens.astype(np.int16).tobytes()` for "bytes"). The new manifest
    copies the source's and records `derived_from`. Returns the new manifest.
    """
    reader = ShardReader(src)
    m = reader.manifest
    columns = {**m["columns"], name: encoding}
    keep = {k: m[k] for k in ("source", "preprocessing", "classes") if k in m}
    shard_size = shard_size or max(s["samples"] for s in m["shards"])
    with ShardWriter(dst, columns, fmt=fmt or m["format"], shard_size=shard_size,
                     derived_from={"path": os.path.abspath(src), "added_column": name}, **keep) as w:
        for start in range(0, len(reader), batch_size):
            batch = [reader[i] for i in range(start, min(start + batch_size, len(reader)))]
            values = list(fn(batch))
            if len(values) != len(batch):
                raise ValueError(f"fn returned {len(values)} values for {len(batch)} samples")
            for s, v in zip(batch, values):
                w.write({**{c: s[c] for c in m["columns"]}, name: v})
    return w.manifest
