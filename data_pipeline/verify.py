"""Check a prepared shard folder against its manifest (the command line over data_pipeline.integrity).

    python -m data_pipeline.verify data/in256/val            # size and sha256 of every shard
    python -m data_pipeline.verify data/in256/val --quick    # sizes only (a stat per shard)
    python -m data_pipeline.verify data/in256/val --decode   # also read and decode every sample

Prints one line per problem (the shard, and for --decode the key of each bad sample) and exits 0 when the
folder is intact, 1 when it is damaged, 2 on a usage error. `manifest.json` records each shard's size and
sha256 when it is written (data_pipeline.shards.finalize).

What readers check when they open a folder, and the errors they raise: data_pipeline.integrity.
"""

from __future__ import annotations

import argparse
import os
import sys

# ShardError is still imported from here by evaluation/recon_fid.py and t2i_fid.py (it moved to integrity;
# kept importable until those files change).
from data_pipeline.integrity import ShardError, shard_problems  # noqa: F401
from divae.utils.cli import EXIT_ERROR, EXIT_OK, UsageError, run_cli


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
