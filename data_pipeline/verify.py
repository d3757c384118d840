"""Check a prepared shard folder against its manifest; the errors every reader raises for damaged shards.

    python -m data_pipeline.verify data/in256/val            # size and sha256 of every shard
    python -m data_pipeline.verify data/in256/val --quick    # sizes only (a stat per shard)
    python -m data_pipeline.verify data/in256/val --decode   # also read and decode every sample

Prints one line per problem (the shard, and for --decode the key of each bad sample) and exits 0 when the
folder is intact, 1 when it is damaged, 2 on a usage error. `manifest.json` records each shard's size and
sha256 when it is written (data_pipeline.shards.finalize).

Readers check shards when they open a folder: the loaders (`data_pipeline.loaders.build_loader`) and
`ShardReader` always compare every shard's size with the manifest (a truncated or replaced file is refused
at once, naming it); `data.verify=true` / `ShardReader(verify=True)` also compares sha256 (a full read of
the data: minutes for ImageNet, split over the ranks). A sample that cannot be read or decoded later raises
a `ShardError` that names the shard and the sample's key; the loaders' `data.bad_samples` decides whether
that ends the run ("error", the default) or the sample is skipped with a warning and counted ("skip").
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable

from data_pipeline.shards import sha256_file
from divae.utils.cli import EXIT_ERROR, EXIT_OK, UsageError, one_line, run_cli


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


def decode_problems(path: str, manifest: dict) -> list[str]:
    """Read every sample of the folder and decode its image: one message per sample that fails."""
    from data_pipeline.reader import ShardReader

    reader = ShardReader(path, decode_image="jpg" in manifest.get("columns", {}))
    out = []
    for i in range(len(reader)):
        try:
            reader[i]
        except ShardError as e:
            out.append(str(e).split("; run `python -m data_pipeline.verify")[0])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a prepared shard folder (with manifest.json)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="sizes only, no sha256")
    g.add_argument("--decode", action="store_true", help="also read and decode every sample")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error")
    args = p.parse_args(argv)
    from data_pipeline.shards import MANIFEST, load_manifest

    if not os.path.isdir(args.folder):
        raise UsageError(f"{args.folder}: no such folder")
    if not os.path.isfile(os.path.join(args.folder, MANIFEST)):
        raise UsageError(f"{args.folder} has no {MANIFEST}: not a folder written by data_pipeline.prepare_*")
    manifest = load_manifest(args.folder)
    problems = shard_problems(args.folder, manifest, sha256=not args.quick)
    if args.decode and not shard_problems(args.folder, manifest):  # every size right: the samples can be read
        problems += decode_problems(args.folder, manifest)
    for line in problems:
        print(line)
    n = len(manifest.get("shards", []))
    what = "size" if args.quick else "size, sha256" + (", every sample decoded" if args.decode else "")
    if problems:
        print(f"{args.folder}: {len(problems)} problem(s) in {n} shard(s) ({what})", file=sys.stderr)
        return EXIT_ERROR
    print(f"{args.folder}: {n} shard(s), {manifest.get('num_samples', '?')} samples intact ({what})")
    return EXIT_OK


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv, prog="python -m data_pipeline.verify", runtime=(ShardError,))


if __name__ == "__main__":
    from data_pipeline.verify import cli as _cli  # the package module's classes, not __main__'s copies

    sys.exit(_cli())
