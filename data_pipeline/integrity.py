"""The errors every reader raises for damaged shards, and the check of a folder against its manifest.

Readers check shards when they open a folder: the loaders (`data_pipeline.loaders.build_loader`) and
`ShardReader` always compare every shard's size with the manifest (a truncated or replaced file is refused
at once, naming it); `data.verify=true` / `ShardReader(verify=True)` also compares sha256 (a full read of
the data: minutes for ImageNet, split over the ranks). A sample that cannot be read or decoded later raises
a `ShardError` that names the shard and the sample's key; the loaders' `data.bad_samples` decides whether
that ends the run ("error", the default) or the sample is skipped with a warning and counted ("skip").
The command line over these checks is `python -m data_pipeline.verify`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from divae.utils.cli import one_line
from divae.utils.files import sha256_file


class ShardError(RuntimeError):
    """A shard that does not match its manifest, or a sample in it that cannot be read (a runtime error)."""



def shard_problems(path: str, manifest: dict, *, sha256: bool = False,
                   hash_only: Iterable[int] | None = None) -> list[str]:
    """One message per shard of `manifest` (the folder `path`'s) that is missing, has another size than the
    manifest records, or (with `sha256`) other contents. `hash_only`: indices of the shards to hash (e.g.
    this rank's share); default all."""
    hashed = None if hash_only is None else set(hash_only)
    out = []
    for i, s in enumerate(manifest.get("shards", [])):
        name = s["basename"]
        f = os.path.join(path, name)
        if os.path.basename(name) != name or name in ("", ".", ".."):
            out.append(f"{path}: manifest names shard {name!r}, which is not a file name in the folder")
            continue
        try:
            size = os.path.getsize(f)
        except OSError as e:
            out.append(f"{f}: missing or unreadable ({e.strerror or e})")
            continue
        if "bytes" in s and size != s["bytes"]:
            what = "truncated" if size < s["bytes"] else "longer than written"
            out.append(f"{f}: {size} bytes, the manifest says {s['bytes']} ({what})")
            continue
        if sha256 and s.get("sha256") and (hashed is None or i in hashed):
            try:
                digest = sha256_file(f)
            except OSError as e:
                out.append(f"{f}: unreadable ({e.strerror or e})")
                continue
            if digest != s["sha256"]:
                out.append(f"{f}: sha256 {digest[:12]}... differs from the manifest's {s['sha256'][:12]}... "
                           "(the file changed after it was written)")
    return out


def check_shards(path: str, manifest: dict, *, sha256: bool = False, hash_only: Iterable[int] | None = None) -> None:
    """Raise a ShardError naming every damaged shard of the folder (see `shard_problems`)."""
    problems = shard_problems(path, manifest, sha256=sha256, hash_only=hash_only)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ShardError(f"{problems[0]}{more}; restore the shard or prepare the folder again "
                         f"(`python -m data_pipeline.verify {path}` lists every problem)")


def sample_error(shard: str, index: int, key: object, err: BaseException) -> ShardError:
    """The error for a sample that cannot be read: names the shard file, the sample's key and index."""
    k = f"key {key!r}" if key is not None else "key unknown"
    why = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", one_line(err))  # no object addresses
    return ShardError(f"{shard}: sample {index} ({k}) cannot be read: {type(err).__name__}: {why}; "
                      f"run `python -m data_pipeline.verify {os.path.dirname(shard) or '.'}`, then restore or "
                      "re-prepare the shard (or set data.bad_samples=skip to train on without it)")
