"""Train the prior's caption tokenizer (byte-level BPE) on the captions of a shard folder.

    python -m data_pipeline.train_tokenizer --shards DIR --vocab-size 16384 [--out PATH]
    python -m data_pipeline.train_tokenizer --captions captions.txt --out tokenizer.json

Reads only the `caption` column of the shard folders under DIR (every `manifest.json` below it, with this
package's shard layout; folders without a manifest: plain MDS `index.json` shards or the `.caption` / `.txt`
members of webdataset tars), or one caption per line from --captions: per MDS sample only its size header and
caption bytes are read, tar members that are not captions are skipped, so no image bytes are read (Conceptual
Captions: ~100 GB of JPEGs for ~0.3 GB of text). Empty captions are
skipped. Writes `DIR/tokenizer.json` (or --out): the JSON that `divae.text_tokenizer.TextTokenizer.load`
reads and that `divae.prior_io.save_prior` embeds in every prior checkpoint.

A shard folder is data, not code: only the caption column is decoded (an index naming a pickle column cannot
run anything), every file name read from a `manifest.json` or `index.json` must stay inside its folder
(relative, no `..`, no symlink below the folder: `data_pipeline.sources.confined_path`; anything else is
refused with an error naming it), compressed MDS shards are decompressed in memory, never to disk, with the
output bounded by the size the index declares, and symlinks met while searching DIR are not followed.
The output file is written to a temporary name and renamed, so a `tokenizer.json` that is a link is
replaced, not written through.
"""

from __future__ import annotations

import argparse
import bz2
import json
import mmap
import os
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_pipeline.shards import ShardFolderError
from divae.text_tokenizer import DEFAULT_MAX_LENGTH, TextTokenizer

MAX_SHARD_BYTES = 1 << 32  # MDS offsets are uint32: no valid shard is larger
MAX_CAPTION_MEMBER_BYTES = 1 << 20  # a webdataset .caption/.txt member larger than 1 MiB is not a caption


def _walk_files(root: Path, match) -> tuple[list[Path], int]:
    """(sorted regular files under `root` whose name satisfies `match`, number of symlinks not followed)."""
    found, links = [], 0
    for dirpath, dirnames, filenames in os.walk(root):  # does not descend into linked folders
        links += sum(os.path.islink(os.path.join(dirpath, d)) for d in dirnames)
        for f in filenames:
            if match(f):
                p = os.path.join(dirpath, f)
                if os.path.islink(p):
                    links += 1
                else:
                    found.append(Path(p))
    return sorted(found), links


def _inside(root: Path, name: object, where: Path) -> Path:
    """`root/name` for a file name read from `where`, refused unless it stays inside `root`."""
    from data_pipeline.sources import UnsafePath, confined_path

    if not isinstance(name, str):
        raise ShardFolderError(f"{where}: file name {name!r} is not a string")
    try:
        return Path(confined_path(str(root), name))
    except UnsafePath as e:
        raise ShardFolderError(f"{where}: refusing shard file {e}; shard files must be inside {root}") from None


def _zstd_content_size(data: bytes) -> int | None:
    """Decompressed size declared in a zstd frame header (None if absent or not a zstd frame)."""
    if len(data) < 6 or data[:4] != b"\x28\xb5\x2f\xfd":
        return None
    fhd = data[4]
    fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    n = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if n == 0 or len(data) < pos + n:
        return None
    size = int.from_bytes(data[pos:pos + n], "little")
    return size + 256 if n == 2 else size


def _snappy_size(data: bytes) -> int | None:
    size, shift = 0, 0
    for i, b in enumerate(data[:10]):
        size |= (b & 0x7F) << shift
        if not b & 0x80:
            return size
        shift += 7
        if i == 9:
            break
    return None


def decompress_bounded(algo: str, data: bytes, size: int, where: str) -> bytes:
    """Decompress a shard in memory into exactly `size` bytes (the size its index declares); never produces
    (or allocates) more than that: a decompression bomb or a wrong size raises ShardFolderError."""
    name = algo.split(":")[0]
    if name == "gz":
        out = zlib.decompressobj(wbits=31).decompress(data, size + 1)
    elif name == "bz2":
        out = bz2.BZ2Decompressor().decompress(data, max_length=size + 1)
    elif name == "br":
        import brotli
        out = brotli.Decompressor().process(data, output_buffer_limit=size + 1)
    elif name in ("zstd", "snappy"):
        declared = _zstd_content_size(data) if name == "zstd" else _snappy_size(data)
        if declared is None or declared != size:
            raise ShardFolderError(f"{where}: compressed shard header declares {declared} bytes, its index {size}")
        from streaming.base.compression import decompress
        out = decompress(algo, data)
    else:
        raise ShardFolderError(f"{where}: unknown shard compression {algo!r}")
    if len(out) != size:
        got = f"more than {size}" if len(out) > size else str(len(out))
        raise ShardFolderError(f"{where}: shard decompresses to {got} bytes, its index declares {size}")
    return out


def _caption_reader(shard: dict, where: Path):
    """(streaming's MDSReader for this index entry, position of the caption column); only a 'str' caption
    column is accepted, and only that column is ever decoded."""
    from streaming.base.format import reader_from_json

    names = shard.get("column_names", [])
    if "caption" not in names:
        raise ShardFolderError(f"{where}: shards have no 'caption' column (columns: {names}); see docs/CONTRACTS.md")
    reader = reader_from_json("", None, shard)  # no files are opened from here: bytes are passed in
    col = reader.column_names.index("caption")
    if reader.column_encodings[col] != "str":
        raise ShardFolderError(f"{where}: the caption column is encoded as {reader.column_encodings[col]!r}, not 'str'")
    return reader, col


def _shard_captions(data: bytes | mmap.mmap, n: int, where: str, column_sizes: list[int | None],
                    col: int) -> Iterator[str]:
    """The caption of each of the n samples of an MDS shard held in memory (or mapped): per sample only the
    size header of the variable-size columns and the caption's bytes are read, never the image bytes (Conceptual
    Captions: ~100 GB of JPEGs for ~0.3 GB of text). `column_sizes`: the MDS layout (None = variable size);
    the offset table is checked against the bytes."""
    if len(data) < 4 + 4 * (n + 1) or int(np.frombuffer(data[:4], np.uint32)[0]) != n:
        raise ShardFolderError(f"{where}: not an MDS shard of {n} samples")
    offsets = np.frombuffer(data[4:4 + 4 * (n + 1)], np.uint32).astype(np.int64)
    if (np.diff(offsets) < 0).any() or offsets[-1] > len(data):
        raise ShardFolderError(f"{where}: corrupt MDS offset table")
    nvar = sum(size is None for size in column_sizes)
    for i in range(n):
        begin, end = int(offsets[i]), int(offsets[i + 1])
        head = np.frombuffer(data[begin:begin + 4 * nvar], np.uint32) if nvar else None
        if nvar and len(head) != nvar:
            raise ShardFolderError(f"{where}: sample {i} is shorter than its size header")
        sizes, v = [], 0
        for size in column_sizes:
            if size is None:
                size, v = int(head[v]), v + 1
            sizes.append(size)
        start = begin + 4 * nvar + sum(sizes[:col])
        if start + sizes[col] > end:
            raise ShardFolderError(f"{where}: sample {i} is shorter than its column sizes")
        yield bytes(data[start:start + sizes[col]]).decode("utf-8")


def _mds_file_captions(path: Path, n: int, column_sizes: list[int | None], col: int) -> Iterator[str]:
    """Captions of the uncompressed MDS shard file `path` of n samples, read in place (mapped, not copied)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ShardFolderError(f"{path}: empty shard file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield from _shard_captions(data, n, str(path), column_sizes, col)


def _mds_captions(index_path: Path) -> Iterator[str]:
    index = json.loads(index_path.read_text())
    root = index_path.parent
    for shard in index["shards"]:
        reader, col = _caption_reader(shard, index_path)
        raw_info, zip_info = shard.get("raw_data") or {}, shard.get("zip_data") or {}
        raw_path = _inside(root, raw_info.get("basename"), index_path)
        size = raw_info.get("bytes")
        n = shard.get("samples")
        if not isinstance(n, int) or n < 0:
            raise ShardFolderError(f"{index_path}: samples {n!r} is not a count")
        if raw_path.is_file():
            yield from _mds_file_captions(raw_path, n, list(reader.column_sizes), col)
        else:  # only the compressed shard is there: decompress it in memory
            zip_path = _inside(root, zip_info.get("basename"), index_path) if zip_info else None
            if zip_path is None or not zip_path.is_file():
                raise FileNotFoundError(f"{index_path}: shard file {raw_path} is missing")
            where = str(zip_path)
            if not isinstance(size, int) or not 0 < size <= MAX_SHARD_BYTES:
                raise ShardFolderError(f"{index_path}: raw_data.bytes {size!r} is not a shard size")
            data = decompress_bounded(str(shard.get("compression")), zip_path.read_bytes(), size, where)
            yield from _shard_captions(data, n, where, list(reader.column_sizes), col)


def _tar_captions(tar_path: Path) -> Iterator[str]:
    from data_pipeline.sources import unsafe_reason

    with tarfile.open(tar_path, mode="r:*") as tf:  # seekable: the members that are not captions are skipped
        for m in tf:
            if (m.name.endswith(".caption") or m.name.endswith(".txt")) and unsafe_reason(m) is None \
                    and m.size <= MAX_CAPTION_MEMBER_BYTES:
                yield tf.extractfile(m).read().decode("utf-8")


def iter_shard_captions(shards: str | Path) -> Iterator[str]:
    """Every caption in the shard folders below `shards`: folders with this package's `manifest.json` are
    read with `data_pipeline.reader.ShardReader`; without one, MDS (index.json) or webdataset (*.tar) files.
    Paths read from those files must stay inside their folder (module docstring)."""
    root = Path(shards)
    if not root.is_dir():
        raise FileNotFoundError(f"--shards {root} is not a folder of shards")
    manifests, links = _walk_files(root, lambda f: f == "manifest.json")
    if links:
        print(f"note: {links} symlink(s) under {root} not followed")
    if manifests:
        from data_pipeline.shards import get_mds_encoded_size, load_manifest

        for m in manifests:
            man = load_manifest(str(m.parent))
            files = [(_inside(m.parent, s.get("basename"), m), s.get("samples")) for s in man.get("shards", [])]
            columns = man.get("columns") or {}
            if "caption" not in columns:
                raise ShardFolderError(f"{m.parent}: shards have no 'caption' column (columns: {sorted(columns)})")
            if columns["caption"] != "str":
                raise ShardFolderError(f"{m}: the caption column is encoded as {columns['caption']!r}, not 'str'")
            names = sorted(columns)  # this package's MDS layout (data_pipeline.shards)
            for path, n in files:
                if not isinstance(n, int) or n < 0:
                    raise ShardFolderError(f"{m}: samples {n!r} is not a count")
                if man.get("format") == "mds":
                    yield from _mds_file_captions(path, n, [get_mds_encoded_size(columns[c]) for c in names],
                                                  names.index("caption"))
                else:
                    yield from _tar_captions(path)
        return
    indexes = _walk_files(root, lambda f: f == "index.json")[0]
    tars = _walk_files(root, lambda f: f.endswith(".tar"))[0]
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


def _write_replacing(path: Path, text: str) -> None:
    """Write `text` to a temporary file next to `path`, then rename it over `path` (a link there is replaced)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
    ap.add_argument("--debug", action="store_true", help="print the full traceback on errors")
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
    _write_replacing(out, tok.to_json())

    sample = captions[:10000]
    _, mask = tok.encode(sample)
    lengths = mask.sum(1)
    truncated = (lengths == tok.max_length).float().mean().item()
    print(f"trained on {len(captions)} captions: vocab {tok.vocab_size}, mean {lengths.float().mean():.1f} "
          f"tokens/caption (incl. BOS/EOS), {100 * truncated:.1f}% at max_length {tok.max_length}; wrote {out}")
    return out


def cli(argv: list[str] | None = None) -> int:
    """The process boundary (`divae.utils.cli`): one `error:` line and exit status 1 for a shard folder that
    cannot be trusted or read, 2 for bad arguments; `--debug` adds the traceback."""
    from divae.utils.cli import run_cli

    def run(args: list[str]) -> int:
        main(args)
        return 0

    return run_cli(run, argv, prog="python -m data_pipeline.train_tokenizer",
                   runtime=(ShardFolderError, tarfile.TarError, UnicodeDecodeError))


if __name__ == "__main__":
    raise SystemExit(cli(sys.argv[1:]))
