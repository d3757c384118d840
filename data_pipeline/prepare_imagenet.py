"""ImageNet-1k (ILSVRC2012) -> shards.

    python -m data_pipeline.prepare_imagenet --split train --source ILSVRC2012_img_train.tar \\
        --devkit ILSVRC2012_devkit_t12.tar.gz --out data/imagenet256/train --workers 16
    python -m data_pipeline.prepare_imagenet --split val --source ILSVRC2012_img_val.tar \\
        --devkit ILSVRC2012_devkit_t12.tar.gz --out data/imagenet256/val
    python -m data_pipeline.prepare_imagenet --split train --source /data/imagenet/train --out ...

--source is the official tar (train: a tar of per-class tars, streamed; val: a flat tar) or an extracted
folder (`train/<wnid>/*.JPEG`; `val/` flat with --devkit, or `val/<wnid>/`). A folder holding a `train`
or `val` subfolder is accepted as well. Labels are class indices in the standard order: the 1000 WordNet
ids sorted. Keys are the file stems (`n01440764_10026`, `ILSVRC2012_val_00000001`); a stem seen twice
(`a.JPEG` and `a.png`) gets `~2` on its second use. In a folder, symbolic links below --source are not
followed (skipped and listed; `data_pipeline.sources`).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import tarfile
from collections.abc import Iterator

import numpy as np

from data_pipeline import prepare
from data_pipeline.sources import (
    TOO_LARGE,
    UNSAFE,
    Item,
    folder_items,
    iter_tar,
    max_bytes,
    stem,
    subfolders,
    tar_skip,
    unsafe_reason,
)

WNID = re.compile(r"^n\d{8}$")
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})")


MAX_DEVKIT_MEMBER_BYTES = 64 << 20  # meta.mat is ~2 MB, the ground truth ~0.3 MB: a larger member is not the devkit


def read_devkit(devkit: str) -> tuple[list[str], list[str]]:
    """Devkit (the .tar.gz or its extracted folder) -> (wnids of the leaf synsets in ILSVRC2012_ID order,
    val ground-truth wnids in val-image order)."""
    import scipy.io

    files: dict[str, bytes] = {}
    wanted = ("data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt")
    too_big = (f"devkit {devkit!r}: {{}} is larger than {MAX_DEVKIT_MEMBER_BYTES >> 20} MiB, which no "
               "ILSVRC2012_devkit_t12 file is; pass the real devkit")
    if os.path.isdir(devkit):
        for root, _, names in os.walk(devkit):
            for n in names:
                rel = os.path.join(root, n).replace(os.sep, "/")
                if rel.endswith(wanted):
                    with open(os.path.join(root, n), "rb") as f:
                        data = f.read(MAX_DEVKIT_MEMBER_BYTES + 1)
                    if len(data) > MAX_DEVKIT_MEMBER_BYTES:
                        raise prepare.UsageError(too_big.format(rel))
                    files[wanted[0] if rel.endswith(wanted[0]) else wanted[1]] = data
    elif os.path.isfile(devkit):  # members over the cap are passed over unread
        for m, data, bad in iter_tar(path=devkit, max_member_bytes=MAX_DEVKIT_MEMBER_BYTES):
            if m.name.endswith(wanted):
                if bad is not None and bad.startswith(TOO_LARGE):
                    raise prepare.UsageError(too_big.format(m.name))
                if bad is None:
                    files[wanted[0] if m.name.endswith(wanted[0]) else wanted[1]] = data
    else:
        raise FileNotFoundError(f"--devkit {devkit!r} does not exist")
    for w in wanted:
        if w not in files:
            raise FileNotFoundError(f"devkit {devkit!r} lacks {w} (expected ILSVRC2012_devkit_t12)")
    # squeeze_me turns a one-synset table into a 0-d record: make it a sequence again
    meta = np.atleast_1d(scipy.io.loadmat(io.BytesIO(files[wanted[0]]), squeeze_me=True)["synsets"])
    leaves = sorted((int(s["ILSVRC2012_ID"]), str(s["WNID"])) for s in meta if int(s["num_children"]) == 0)
    id_to_wnid = dict(leaves)
    gt = []
    for x in files[wanted[1]].decode("ascii", "replace").split():
        if not x.isdigit() or int(x) not in id_to_wnid:
            raise ValueError(f"devkit {devkit!r}: the val ground truth names class {x!r}, which is not a leaf "
                             f"synset of its meta.mat ({len(leaves)} leaves)")
        gt.append(id_to_wnid[int(x)])
    return [w for _, w in leaves], gt


def _split_dir(source: str, split: str) -> str:
    sub = os.path.join(source, split)
    return sub if os.path.isdir(sub) else source


def _subdirs(path: str) -> list[str]:
    return [d for d in subfolders(path) if WNID.match(d)]


def train_tar_wnids(path: str) -> list[str]:
    with tarfile.open(path, "r:") as tf:  # seekable scan of the outer headers only
        return sorted(stem(n) for n in tf.getnames() if WNID.match(stem(n)) and n.endswith(".tar"))


def train_tar_items(path: str, class_index: dict[str, int], max_member_bytes: int | None = None) -> Iterator[Item]:
    """Stream the outer tar; each per-class tar is streamed from it, in memory (members over
    `max_member_bytes` are skipped unread)."""
    with tarfile.open(path, "r|") as outer:
        for m in outer:
            if m.isdir():
                continue
            bad = unsafe_reason(m)
            if bad is not None:
                yield Item(key=m.name, skip=UNSAFE, detail=bad)
                continue
            wnid = stem(m.name)
            if not m.name.endswith(".tar") or wnid not in class_index:
                yield Item(key=m.name, skip="unexpected member", detail="not a <wnid>.tar of a known class")
                continue
            for im, data, ibad in iter_tar(fileobj=outer.extractfile(m), max_member_bytes=max_member_bytes):
                if ibad is not None:
                    yield tar_skip(f"{m.name}/{im.name}", ibad)
                else:
                    yield Item(key=stem(im.name), data=data, label=class_index[wnid])


def val_tar_items(path: str, gt_labels: list[int] | None, max_member_bytes: int | None = None) -> Iterator[Item]:
    for m, data, bad in iter_tar(path=path, max_member_bytes=max_member_bytes):
        if bad is not None:
            yield tar_skip(m.name, bad)
            continue
        yield Item(key=stem(m.name), data=data, label=_val_label(m.name, gt_labels))


def _val_label(name: str, gt_labels: list[int] | None) -> int:
    mt = VAL_NAME.search(name)
    if gt_labels is None or mt is None or not 1 <= int(mt.group(1)) <= len(gt_labels):
        return -1
    return gt_labels[int(mt.group(1)) - 1]


def build_items(args: argparse.Namespace) -> tuple[Iterator[Item], dict, list[str]]:
    """(items, source description, class wnids) for the parsed arguments; bad arguments raise UsageError."""
    src = args.source
    cap = max_bytes(args.max_file_mb)
    if os.path.isfile(src):
        prepare.check_tar(src, "--source")
    elif not os.path.isdir(src):
        raise prepare.UsageError(f"--source {src!r} is neither a tar file nor a folder")
    devkit_wnids, gt = None, None
    if args.devkit:
        if os.path.isfile(args.devkit):
            prepare.check_tar(args.devkit, "--devkit")
        elif not os.path.isdir(args.devkit):
            raise prepare.UsageError(f"--devkit {args.devkit!r} does not exist "
                                     "(ILSVRC2012_devkit_t12.tar.gz or its folder)")
        try:
            devkit_wnids, gt = read_devkit(args.devkit)
        except (OSError, ValueError, KeyError, tarfile.TarError) as e:
            raise prepare.UsageError(f"--devkit {args.devkit!r} cannot be used: {e}") from None
    source = {"kind": "imagenet", "split": args.split, "path": os.path.abspath(src),
              "devkit": os.path.abspath(args.devkit) if args.devkit else None}
    if os.path.isfile(src):
        if args.split == "train":
            wnids = sorted(devkit_wnids) if devkit_wnids else train_tar_wnids(src)
            if not wnids:
                raise prepare.UsageError(f"--source {src!r} holds no <wnid>.tar members; "
                                         "is it ILSVRC2012_img_train.tar?")
            return train_tar_items(src, {w: i for i, w in enumerate(wnids)}, cap), source, wnids
        if gt is None:
            raise prepare.UsageError("the val tar has no labels inside; pass --devkit ILSVRC2012_devkit_t12.tar.gz")
        wnids = sorted(devkit_wnids)
        index = {w: i for i, w in enumerate(wnids)}
        return val_tar_items(src, [index[w] for w in gt], cap), source, wnids
    root = _split_dir(src, args.split)
    classes = _subdirs(root)
    if classes:
        wnids = sorted(devkit_wnids) if devkit_wnids else classes
        return _stem_keys(folder_items(root, {w: i for i, w in enumerate(wnids)})), source, wnids
    if args.split == "train":
        raise prepare.UsageError(f"{root} has no <wnid>/ subfolders (expected train/n01440764/*.JPEG ...)")
    if gt is None:
        raise prepare.UsageError(f"{root} is a flat val folder; pass --devkit for its labels")
    wnids = sorted(devkit_wnids)
    index = {w: i for i, w in enumerate(wnids)}
    labels = [index[w] for w in gt]

    def flat() -> Iterator[Item]:
        for it in folder_items(root):
            it.label = _val_label(it.key, labels)
            yield it
    return _stem_keys(flat()), source, wnids


def _stem_keys(items: Iterator[Item]) -> Iterator[Item]:
    """Folder keys as the official tar gives them (file stem), so both inputs give the same keys (entries
    passed over keep their relative path, which says where they are)."""
    for it in items:
        if it.skip is None:
            it.key = stem(it.key)
        yield it


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.prepare_imagenet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=["train", "val"], required=True)
    p.add_argument("--source", required=True, help="ILSVRC2012_img_{train,val}.tar or an extracted folder")
    p.add_argument("--devkit", default=None, help="ILSVRC2012_devkit_t12.tar.gz (or folder); needed for val")
    prepare.add_common_args(p)
    args = p.parse_args(argv)
    prepare.validate_common(args)
    cfg = prepare.image_config(args)
    items, source, wnids = build_items(args)
    prepare.check_out(args.out)
    if len(wnids) != 1000:
        print(f"note: {len(wnids)} classes found (ImageNet-1k has 1000)")
    return prepare.run_prepare(items, args.out, fmt=args.format, cfg=cfg, shard_size=args.shard_size,
                               workers=args.workers, source=source, limit=args.limit, progress=not args.no_progress,
                               manifest_extra={"classes": wnids}, max_file_bytes=max_bytes(args.max_file_mb))


if __name__ == "__main__":
    raise SystemExit(prepare.cli(main, "python -m data_pipeline.prepare_imagenet"))
