"""Conceptual Captions (CC3M/CC12M) -> shards with captions.

    python -m data_pipeline.prepare_cc --source cc3m_img2dataset/ --out data/cc3m256 --min-size 128
    python -m data_pipeline.prepare_cc --tsv cc3m_local.tsv --out data/cc3m256

--source: img2dataset output, a folder of webdataset tars (read in sorted order) with `{key}.jpg`,
`{key}.txt` (caption) and `{key}.json` per sample; the img2dataset key is kept. Only the members used are read
(`.jpg`/`.jpeg` up to --max-file-mb, `.txt` up to 1 MiB); others (`.json`, or `sample.000001.jpg`, whose key is
`sample` and extension `000001.jpg`) are passed over unread, so memory is bounded per sample whatever the tar
holds. A key with two images or two captions is skipped ("duplicate member"). --tsv: lines of
`caption<TAB>image path` (relative paths are relative to the TSV's folder); the key is the 0-based line
number, 9 digits (img2dataset's scheme); the TSV is read as UTF-8 (invalid bytes in a caption become U+FFFD,
in a path they name the file's bytes). Captions: whitespace collapsed, empty ones skipped ("empty caption"),
cut to --max-caption-chars at a word boundary. --min-size skips small sources.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

from data_pipeline import prepare
from data_pipeline.sources import NOT_WANTED, Item, iter_tar, max_bytes, tar_skip

EMPTY_CAPTION = "empty caption"
NO_IMAGE = "missing image"
DUPLICATE = "duplicate member"
MAX_CAPTION_BYTES = 1 << 20  # a caption is cut to --max-caption-chars anyway; a .txt member larger is skipped unread
WANTED = {"jpg": "jpg", "jpeg": "jpg", "txt": "txt"}  # member extension -> what the sample uses it as


def clean_caption(text: str, max_chars: int) -> str:
    text = " ".join(text.split())
    if len(text) > max_chars:
        cut = text[:max_chars]
        text = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return text


def _split(name: str) -> tuple[str, str]:
    """webdataset's rule: (key, extension) = the member's base name cut at its first dot."""
    k, _, ext = os.path.basename(name).partition(".")
    return k, ext.lower()


def _wanted(name: str) -> bool | int:
    """iter_tar's `wanted`: images (capped by --max-file-mb), captions (capped at MAX_CAPTION_BYTES), nothing else."""
    use = WANTED.get(_split(name)[1])
    return False if use is None else (MAX_CAPTION_BYTES if use == "txt" else True)


class _Sample:
    """The members of one key: only the wanted ones' bytes are held (at most one image and one caption)."""

    def __init__(self, key: str):
        self.key, self.files, self.names = key, {}, {}
        self.passed, self.first_passed, self.duplicate = 0, "", ""

    def add(self, name: str, data: bytes) -> None:
        use = WANTED[_split(name)[1]]
        if use in self.names:  # a second image or caption: which one is the sample's is unknowable
            self.duplicate = self.duplicate or f"two .{use} members: {self.names[use]!r} and {name!r}"
            self.files.clear()  # hold nothing more for a key that will be skipped
            return
        self.names[use] = name
        if not self.duplicate:
            self.files[use] = data

    def finish(self, max_chars: int) -> Item:
        if self.duplicate:
            return Item(key=self.key, skip=DUPLICATE, detail=self.duplicate)
        cap = clean_caption(self.files.get("txt", b"").decode("utf-8", "replace"), max_chars)
        if "jpg" not in self.files:
            detail = "no .jpg member"
            if self.passed:
                detail += (f"; {self.passed} member(s) of other kinds passed over unread, e.g. {self.first_passed!r} "
                           f"(a sample's members are <key>.jpg and <key>.txt, the key ending at the first dot)")
            return Item(key=self.key, skip=NO_IMAGE, detail=detail)
        if not cap:
            return Item(key=self.key, skip=EMPTY_CAPTION)
        return Item(key=self.key, data=self.files["jpg"], caption=cap)


def wds_tars(folder: str) -> list[str]:
    """The sorted .tar files of an img2dataset folder, each checked to be a tar; raises UsageError."""
    if not os.path.isdir(folder):
        raise prepare.UsageError(f"--source {folder!r} is not a folder (expected img2dataset webdataset output)")
    tars = sorted(f for f in os.listdir(folder) if f.endswith(".tar"))
    if not tars:
        raise prepare.UsageError(f"no .tar files in --source {folder!r} (expected img2dataset webdataset output)")
    for t in tars:
        prepare.check_tar(os.path.join(folder, t), "--source")
    return tars


def wds_items(folder: str, max_chars: int, max_member_bytes: int | None = None) -> Iterator[Item]:
    """Items of the tars in `folder`. Memory is one sample's wanted members at most (module docstring)."""
    for t in wds_tars(folder):
        cur: _Sample | None = None
        for m, data, bad in iter_tar(path=os.path.join(folder, t), max_member_bytes=max_member_bytes,
                                     wanted=_wanted):
            if bad is not None and bad != NOT_WANTED:  # unsafe or too large: listed on its own
                yield tar_skip(f"{t}/{m.name}", bad)
                continue
            k = _split(m.name)[0]
            if cur is None or k != cur.key:
                if cur is not None:
                    yield cur.finish(max_chars)
                cur = _Sample(k)
            if bad == NOT_WANTED:
                cur.passed += 1
                cur.first_passed = cur.first_passed or m.name
            else:
                cur.add(m.name, data)
        if cur is not None:
            yield cur.finish(max_chars)


def tsv_items(path: str, max_chars: int) -> Iterator[Item]:
    root = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        for n, raw in enumerate(f):
            cap_raw, _, img_raw = raw.rstrip(b"\r\n").rpartition(b"\t")
            cap, img = cap_raw.decode("utf-8", "replace"), os.fsdecode(img_raw)
            if n == 0 and raw.lower().startswith(b"caption\t"):
                continue  # header
            key = f"{n:09d}"
            cap = clean_caption(cap, max_chars)
            if not img:
                yield Item(key=key, skip=NO_IMAGE, detail="no path column")
            elif not cap:
                yield Item(key=key, skip=EMPTY_CAPTION)
            else:
                yield Item(key=key, path=img if os.path.isabs(img) else os.path.join(root, img), caption=cap)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.prepare_cc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--source", help="folder of img2dataset webdataset tars")
    g.add_argument("--tsv", help="TSV of caption<TAB>local image path")
    p.add_argument("--max-caption-chars", type=int, default=512)
    p.add_argument("--min-size", type=int, default=0, help="skip sources whose shorter side is smaller")
    prepare.add_common_args(p, shard_size=5000)
    args = p.parse_args(argv)
    prepare.validate_common(args)
    if args.max_caption_chars < 1:
        raise prepare.UsageError(f"--max-caption-chars must be >= 1 (got {args.max_caption_chars})")
    cfg = prepare.image_config(args, min_size=args.min_size)
    if args.source:
        wds_tars(args.source)  # checked now, before any work
        items = wds_items(args.source, args.max_caption_chars, max_bytes(args.max_file_mb))
        src = {"kind": "conceptual_captions", "img2dataset": os.path.abspath(args.source)}
    else:
        if not os.path.isfile(args.tsv):
            raise prepare.UsageError(f"--tsv {args.tsv!r} does not exist")
        items = tsv_items(args.tsv, args.max_caption_chars)
        src = {"kind": "conceptual_captions", "tsv": os.path.abspath(args.tsv)}
    src["max_caption_chars"] = args.max_caption_chars
    prepare.check_out(args.out)
    return prepare.run_prepare(items, args.out, fmt=args.format, cfg=cfg, shard_size=args.shard_size,
                               workers=args.workers, source=src, limit=args.limit, progress=not args.no_progress,
                               max_file_bytes=max_bytes(args.max_file_mb))


if __name__ == "__main__":
    raise SystemExit(prepare.cli(main, "python -m data_pipeline.prepare_cc"))
