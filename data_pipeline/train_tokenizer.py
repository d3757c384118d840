"""Train the prior's caption tokenizer (byte-level BPE) on the captions of a shard folder.

    python -m data_pipeline.train_tokenizer --shards DIR --vocab-size 16384 [--out PATH]
    python -m data_pipeline.train_tokenizer --captions captions.txt --out tokenizer.json

Reads the `caption` column of the shard folders under DIR (every `manifest.json` below it, through
`data_pipeline.reader.ShardReader`; folders without a manifest: plain MDS `index.json` shards or the `.caption`
/ `.txt` members of webdataset tars), or one caption per line from --captions. Empty captions are
skipped. Writes `DIR/tokenizer.json` (or --out): the JSON that `divae.text_tokenizer.TextTokenizer.load`
reads and that `divae.prior.save_prior` embeds in every prior checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from divae.text_tokenizer import DEFAULT_MAX_LENGTH, TextTokenizer


def _mds_captions(index_path: Path) -> Iterator[str]:
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    index = json.loads(index_path.read_text())
    root = index_path.parent
    for shard in index["shards"]:
        if "caption" not in shard.get("column_names", []):
            raise ValueError(f"{index_path}: shards have no 'caption' column (columns: "
                             f"{shard.get('column_names')}); see docs/CONTRACTS.md")
        raw_name = shard["raw_data"]["basename"]
        if (root / raw_name).is_file():
            reader = reader_from_json(str(root), None, shard)
            for i in range(len(reader)):
                yield reader.get_item(i)["caption"]
        else:  # only the compressed shard is there: decompress it into a temporary folder
            zip_info = shard.get("zip_data")
            if not zip_info or not (root / zip_info["basename"]).is_file():
                raise FileNotFoundError(f"{index_path}: shard file {root / raw_name} is missing")
            with tempfile.TemporaryDirectory() as tmp:
                raw = decompress(shard["compression"], (root / zip_info["basename"]).read_bytes())
                (Path(tmp) / raw_name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / raw_name).write_bytes(raw)
                reader = reader_from_json(tmp, None, shard)
                for i in range(len(reader)):
                    yield reader.get_item(i)["caption"]


def _tar_captions(tar_path: Path) -> Iterator[str]:
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if m.isfile() and (m.name.endswith(".caption") or m.name.endswith(".txt")):
                yield tf.extractfile(m).read().decode("utf-8")


def iter_shard_captions(shards: str | Path) -> Iterator[str]:
    """Every caption in the shard folders below `shards`: folders with this package's `manifest.json` are
    read with `data_pipeline.reader.ShardReader`; without one, MDS (index.json) or webdataset (*.tar) files."""
    root = Path(shards)
    if not root.is_dir():
        raise FileNotFoundError(f"--shards {root} is not a folder of shards")
    manifests = sorted(root.rglob("manifest.json"))
    if manifests:
        from data_pipeline.reader import ShardReader

        for m in manifests:
            reader = ShardReader(str(m.parent), decode_image=False)
            if "caption" not in reader.columns:
                raise ValueError(f"{m.parent}: shards have no 'caption' column (columns: {sorted(reader.columns)})")
            for i in range(len(reader)):
                yield reader[i]["caption"]
        return
    indexes = sorted(root.rglob("index.json"))
    tars = sorted(root.rglob("*.tar"))
    if not indexes and not tars:
        raise FileNotFoundError(f"no MDS index.json or webdataset .tar shards under {root}")
    for p in indexes:
        yield from _mds_captions(p)
    for p in tars:
        yield from _tar_captions(p)


def iter_text_captions(path: str | Path) -> Iterator[str]:
    """One caption per line of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--captions {path} is not a file (one caption per line)")
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\n")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.train_tokenizer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="folder of MDS or webdataset shards with a caption column")
    src.add_argument("--captions", help="text file, one caption per line")
    ap.add_argument("--vocab-size", type=int, default=16384, help="BPE vocabulary size (default 16384)")
    ap.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                    help="caption length in tokens incl. [BOS]/[EOS] (default 64)")
    ap.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default 2)")
    ap.add_argument("--limit", type=int, default=None, help="use at most this many captions")
    ap.add_argument("--out", default=None, help="output path (default: SHARDS/tokenizer.json)")
    args = ap.parse_args(argv)

    if args.out is None and args.shards is None:
        ap.error("--out is required with --captions")
    out = Path(args.out) if args.out else Path(args.shards) / "tokenizer.json"
    source = iter_shard_captions(args.shards) if args.shards else iter_text_captions(args.captions)

    captions: list[str] = []
    for c in source:
        if args.limit is not None and len(captions) >= args.limit:
            break
        if c.strip():
            captions.append(c)
    if not captions:
        raise SystemExit(f"no non-empty captions found in {args.shards or args.captions}")

    tok = TextTokenizer.train(captions, args.vocab_size, max_length=args.max_length,
                              min_frequency=args.min_frequency)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(out)

    sample = captions[:10000]
    _, mask = tok.encode(sample)
    lengths = mask.sum(1)
    truncated = (lengths == tok.max_length).float().mean().item()
    print(f"trained on {len(captions)} captions: vocab {tok.vocab_size}, mean {lengths.float().mean():.1f} "
          f"tokens/caption (incl. BOS/EOS), {100 * truncated:.1f}% at max_length {tok.max_length}; wrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
