"""Shard files (MDS or webdataset tar), their index, and `manifest.json`.

An output folder holds `shard.00000.mds` ... (or `shard.00000.tar` ...), for MDS the `index.json` that
mosaicml-streaming reads, and `manifest.json`:

    {"format": "mds"|"wds", "columns": {name: encoding}, "source": {...}, "preprocessing": {...},
     "counts": {"inputs", "written", "skipped", "skipped_by_reason"}, "shards": [{"basename", "samples",
     "bytes", "sha256"}], "skipped": [{"key", "reason"}], "complete": true, ...}

Standard columns (docs/CONTRACTS.md): jpg bytes, label int (-1 if none), caption str ("" if none), key str,
orig_size str "WxH". Extra columns take any MDS encoding name (e.g. "bytes", "int", "str", "json").

Shard bytes depend only on the samples (no timestamps, fixed tar headers), so the same input gives the same
checksums. MDS shards are written here byte-for-byte in streaming's MDS v2 layout (the layout `MDSWriter`
produces) so that each shard can be written on its own, under its final name, atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from typing import Any

import numpy as np

from data_pipeline.integrity import ShardError

STANDARD_COLUMNS = {"jpg": "bytes", "label": "int", "caption": "str", "key": "str", "orig_size": "str"}
FORMATS = ("mds", "wds")
MANIFEST = "manifest.json"
INDEX = "index.json"  # the MDS shard list mosaicml-streaming reads (checked against the manifest)


# The common MDS encodings, done here so that the prepare CLIs need not import streaming (and torch, ~10 s).
_FAST = {"bytes": (None, bytes, bytes), "str": (None, lambda v: v.encode("utf-8"), lambda b: b.decode("utf-8")),
         "int": (8, lambda v: np.int64(v).tobytes(), lambda b: int(np.frombuffer(b, np.int64)[0]))}


def mds_encode(enc: str, value: Any) -> bytes:
    if enc in _FAST:
        if enc == "int" and not isinstance(value, (int, np.integer)):
            raise TypeError(f"int column got {type(value).__name__}")
        return _FAST[enc][1](value)
    from streaming.base.format.mds.encodings import mds_encode as enc_fn
    return enc_fn(enc, value)


def mds_decode(enc: str, data: bytes) -> Any:
    if enc in _FAST:
        return _FAST[enc][2](data)
    from streaming.base.format.mds.encodings import mds_decode as dec_fn
    return dec_fn(enc, data)


def get_mds_encoded_size(enc: str) -> int | None:
    if enc in _FAST:
        return _FAST[enc][0]
    from streaming.base.format.mds.encodings import get_mds_encoded_size as size_fn
    return size_fn(enc)


def is_mds_encoding(enc: str) -> bool:
    if enc in _FAST:
        return True
    from streaming.base.format.mds.encodings import is_mds_encoding as check_fn
    return check_fn(enc)


def shard_basename(index: int, fmt: str) -> str:
    return f"shard.{index:05d}.{'mds' if fmt == 'mds' else 'tar'}"


def _check_columns(columns: dict[str, str]) -> None:
    for name, enc in columns.items():
        if not is_mds_encoding(enc):
            raise ValueError(f"column {name!r}: unknown encoding {enc!r} (use an MDS encoding such as "
                             "'bytes', 'int', 'str', 'json', 'ndarray:int32')")
        if "." in name or "/" in name:
            raise ValueError(f"column name {name!r} must not contain '.' or '/'")


def _mds_config(columns: dict[str, str]) -> dict[str, Any]:
    names = sorted(columns)
    return {"column_encodings": [columns[n] for n in names], "column_names": names,
            "column_sizes": [get_mds_encoded_size(columns[n]) for n in names], "compression": None,
            "format": "mds", "hashes": [], "size_limit": None, "version": 2}


def encode_mds_shard(samples: list[dict], columns: dict[str, str]) -> tuple[bytes, dict]:
    """Samples -> (MDS v2 shard bytes, the shard's index.json entry without raw_data)."""
    cfg = _mds_config(columns)
    config_data = json.dumps(cfg, sort_keys=True).encode("utf-8")
    encoded = []
    for s in samples:
        sizes, parts = [], []
        for name, enc, size in zip(cfg["column_names"], cfg["column_encodings"], cfg["column_sizes"]):
            datum = mds_encode(enc, s[name])
            if size is None:
                sizes.append(len(datum))
            parts.append(datum)
        encoded.append(np.array(sizes, np.uint32).tobytes() + b"".join(parts))
    n = np.uint32(len(encoded))
    offsets = np.array([0] + [len(e) for e in encoded], np.int64).cumsum()
    offsets += 4 + 4 * (len(encoded) + 1) + len(config_data)
    if offsets[-1] >= 2**32:
        raise ValueError("MDS shard would exceed 4 GiB; use a smaller --shard-size")
    data = n.tobytes() + offsets.astype(np.uint32).tobytes() + config_data + b"".join(encoded)
    return data, dict(cfg, samples=len(encoded), zip_data=None)


def decode_mds_sample(data: bytes, names: list[str], encs: list[str]) -> dict[str, Any]:
    """One sample's bytes, in the layout `encode_mds_shard` writes (a uint32 size per variable-size column, then
    the values in column-name order), -> {column: value}. Training reads the same bytes through streaming's
    MDSReader (data_pipeline.loaders); this is the random-access path (data_pipeline.reader)."""
    sizes, idx = [], 0
    for enc in encs:
        size = get_mds_encoded_size(enc)
        if size is None:
            size = int(np.frombuffer(data[idx:idx + 4], np.uint32)[0])
            idx += 4
        sizes.append(size)
    out = {}
    for name, enc, size in zip(names, encs, sizes):
        out[name] = mds_decode(enc, data[idx:idx + size])
        idx += size
    return out


def _text(value: Any, enc: str) -> bytes:
    if enc == "bytes":
        return bytes(value)
    if enc == "str":
        return str(value).encode("utf-8")
    if enc == "int":
        return str(int(value)).encode("ascii")
    return mds_encode(enc, value)


def encode_wds_shard(samples: list[dict], columns: dict[str, str], shard_index: int) -> bytes:
    """Samples -> webdataset tar bytes; member `{shard:05d}_{pos:06d}.{column}`, fixed headers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for pos, s in enumerate(samples):
            for name in sorted(columns):
                payload = _text(s[name], columns[name])
                info = tarfile.TarInfo(f"{shard_index:05d}_{pos:06d}.{name}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def decode_wds_value(raw: bytes, enc: str) -> Any:
    if enc == "bytes":
        return raw
    if enc == "str":
        return raw.decode("utf-8")
    if enc == "int":
        return int(raw.decode("ascii"))
    return mds_decode(enc, raw)


def write_shard(out_dir: str, index: int, fmt: str, samples: list[dict], columns: dict[str, str]) -> dict:
    """Write one shard atomically (temp name, then rename). Returns its manifest entry (+ "mds" entry)."""
    basename = shard_basename(index, fmt)
    if fmt == "mds":
        data, entry = encode_mds_shard(samples, columns)
    elif fmt == "wds":
        data, entry = encode_wds_shard(samples, columns, index), None
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    tmp = os.path.join(out_dir, f".{basename}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out_dir, basename))
    info = {"basename": basename, "samples": len(samples), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}
    if entry is not None:
        entry["raw_data"] = {"basename": basename, "bytes": len(data), "hashes": {}}
        info["mds"] = entry
    return info


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def finalize(out_dir: str, fmt: str, columns: dict[str, str], shards: list[dict], **manifest: Any) -> dict:
    """Write index.json (MDS) and then manifest.json (last, so its presence means the folder is complete).

    `shards` are `write_shard` results in order; shards with 0 samples are allowed and left out.
    `manifest` adds fields such as source, preprocessing, counts, skipped.
    """
    shards = [s for s in shards if s["samples"] > 0]
    if fmt == "mds":
        write_json_atomic(os.path.join(out_dir, INDEX),
                          {"version": 2, "shards": [s["mds"] for s in shards]})
    obj = {"format": fmt, "columns": dict(columns), "num_samples": sum(s["samples"] for s in shards),
           "shards": [{k: s[k] for k in ("basename", "samples", "bytes", "sha256")} for s in shards],
           "complete": True, **manifest}
    write_json_atomic(os.path.join(out_dir, MANIFEST), obj)
    return obj


def load_manifest(path: str) -> dict:
    """Read `<path>/manifest.json`, with a clear error when it is missing or incomplete."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        hint = " (a prepare run may still be in progress or was interrupted: rerun it)" \
            if os.path.isdir(os.path.join(path, ".partial")) else ""
        raise FileNotFoundError(f"no {MANIFEST} in {path!r}{hint}; prepare the data with "
                                "`python -m data_pipeline.prepare_imagenet|prepare_folder|prepare_cc|prepare_coco`")
    with open(mpath) as f:
        m = json.load(f)
    if not m.get("complete"):
        raise ValueError(f"{mpath} is not marked complete; rerun the prepare command")
    for s in m.get("shards", []):
        check_shard_name(s.get("basename"), mpath)
    for name, enc in (m.get("columns") or {}).items():
        if not is_mds_encoding_safe(enc):
            raise ShardFolderError(f"{mpath}: column {name!r} has encoding {enc!r}, which unpickles or is unknown; "
                             "refusing to read it (only data encodings such as bytes, str, int, json are read)")
    if m.get("format") == "mds":
        check_index(path, m)
    return m


MAX_INDEX_BYTES = 64 << 20  # index.json of 100k shards is ~60 MB; a larger one is not ours


def check_index(path: str, manifest: dict) -> None:
    """Check `<path>/index.json` (what mosaicml-streaming reads) against the folder's manifest: the same shards
    in the same order, each with the manifest's file name, bytes and sample count, the manifest's columns and
    encodings, uncompressed, no second file. The manifest's names are confined to the folder and its sizes and
    hashes are what readers check, so an index that agrees with it can be trusted too; raises ShardFolderError
    naming the first difference."""
    ipath = os.path.join(path, INDEX)
    try:
        with open(ipath, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
        if len(raw) > MAX_INDEX_BYTES:
            raise ValueError(f"larger than {MAX_INDEX_BYTES >> 20} MiB")
        entries = json.loads(raw)["shards"]
        if not isinstance(entries, list):
            raise ValueError("'shards' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardFolderError(f"{ipath} is missing or unreadable ({type(e).__name__}: {e}); prepare the folder "
                               "again") from None
    want = [_index_view(_mds_config(manifest["columns"]), s) for s in manifest.get("shards", [])]
    if len(entries) != len(want):
        raise ShardFolderError(f"{ipath} lists {len(entries)} shards, {MANIFEST} {len(want)}; refusing to read the "
                               "folder (index.json was edited or belongs to another folder): prepare it again")
    for i, (entry, w) in enumerate(zip(entries, want)):
        have = _index_view(entry if isinstance(entry, dict) else {}, None)
        diff = sorted(k for k in w if have.get(k) != w[k])
        if diff:
            raise ShardFolderError(f"{ipath}: shard {i} has {diff[0]}={have.get(diff[0])!r}, {MANIFEST} says "
                                   f"{w[diff[0]]!r}; refusing to read the folder (index.json was edited or belongs "
                                   "to another folder): prepare it again")


def _index_view(entry: dict, shard: dict | None) -> dict:
    """The fields of an index.json shard entry that decide which file is read and how (from the entry itself,
    or, with `shard`, what the manifest's `shard` implies for an entry of `entry`'s config)."""
    raw = entry.get("raw_data") if shard is None else {"basename": shard["basename"], "bytes": shard["bytes"]}
    raw = raw if isinstance(raw, dict) else {}
    return {"raw_data.basename": raw.get("basename"), "raw_data.bytes": raw.get("bytes"),
            "samples": entry.get("samples") if shard is None else shard["samples"],
            "column_names": entry.get("column_names"), "column_encodings": entry.get("column_encodings"),
            "column_sizes": entry.get("column_sizes"), "format": entry.get("format"),
            "compression": entry.get("compression"), "zip_data": entry.get("zip_data")}


def is_mds_encoding_safe(enc: str) -> bool:
    """A known MDS encoding whose decoding runs no code (not 'pkl')."""
    if enc in _FAST:
        return True
    from streaming.base.format.mds.encodings import is_mds_encoding
    from streaming.base.format.mds.encodings import is_mds_encoding_safe as safe_fn
    return is_mds_encoding(enc) and safe_fn(enc)


class ShardFolderError(ShardError, ValueError):
    """A shard folder whose manifest or index cannot be trusted: a file name outside the folder, an encoding
    that would run code, a compressed shard larger than declared, an index.json that disagrees with the
    manifest. A ShardError, so every command line reports it in one line (exit 1)."""


def check_shard_name(name: Any, where: str) -> str:
    """A shard file name read from a manifest or index: a plain file name (no folder part, not `.`/`..`), so
    that the file opened is inside the shard folder whatever the data file says; raises ShardFolderError."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\x00" in name or (len(name) > 1 and name[1] == ":"):
        raise ShardFolderError(f"{where}: shard name {name!r} is not a plain file name in the shard folder; refusing "
                         "to read it (the file was not written by this package, or was tampered with)")
    return name


class ShardWriter:
    """Write samples into fixed-size shards plus index.json/manifest.json.

    For new shard folders that are not `prepare_*` outputs, e.g. `trainer.pre_encode` adding a `tokens`
    column:

        with ShardWriter(out, columns={**STANDARD_COLUMNS, "tokens": "bytes"}, fmt="mds",
                         shard_size=2000, source={...}) as w:
            for sample in samples:
                w.write(sample)       # dict with every column

    Samples keep their order; a shard holds `shard_size` samples. Not resumable (write to a fresh folder).
    """

    def __init__(self, out_dir: str, columns: dict[str, str], fmt: str = "mds", shard_size: int = 2000,
                 **manifest: Any):
        _check_columns(columns)
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(os.path.join(out_dir, MANIFEST)):
            raise FileExistsError(f"{out_dir} already holds a dataset ({MANIFEST}); choose a new folder")
        self.out_dir, self.columns, self.fmt, self.shard_size = out_dir, dict(columns), fmt, shard_size
        self.manifest_extra = manifest
        self._buf: list[dict] = []
        self._shards: list[dict] = []
        self.manifest: dict | None = None

    def write(self, sample: dict) -> None:
        missing = set(self.columns) - set(sample)
        if missing:
            raise KeyError(f"sample lacks columns {sorted(missing)}")
        self._buf.append(sample)
        if len(self._buf) == self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._shards.append(write_shard(self.out_dir, len(self._shards), self.fmt, self._buf, self.columns))
            self._buf = []

    def close(self) -> dict:
        self._flush()
        n = sum(s["samples"] for s in self._shards)
        extra = {"counts": {"written": n}, **self.manifest_extra}
        self.manifest = finalize(self.out_dir, self.fmt, self.columns, self._shards, **extra)
        return self.manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

