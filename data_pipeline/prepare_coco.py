"""MSCOCO 2014 val -> the text-to-image evaluation set: N (caption, reference image) pairs.

    python -m data_pipeline.prepare_coco --captions annotations/captions_val2014.json \\
        --images val2014/ --out data/coco_t2i_val --num-pairs 30000 --seed 0

Draw (fixed seed, numpy PCG64): `num_pairs` distinct image ids from the sorted ids of images that have a
caption, then one of each image's captions (annotations sorted by id). Sample i of the output is pair i:
caption = the drawn caption, the image center-cropped to --size (256), extra column `image_id` (int),
key = `{i:05d}_{image_id}`. `pairs.json` lists the same pairs for tools that need only the text.
A `file_name` that is absolute, contains `..` or passes through a symlink below --images is not read: the
pair is skipped and listed with reason "unsafe path" (`data_pipeline.sources.confined_path`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator

import numpy as np

from data_pipeline import prepare
from data_pipeline.sources import UNSAFE_PATH, Item, UnsafePath, confined_path, max_bytes


def draw_pairs(captions_json: str, num_pairs: int, seed: int) -> list[dict]:
    """The drawn pairs (module docstring); a file that is not COCO captions JSON raises UsageError."""
    try:
        with open(captions_json, encoding="utf-8") as f:
            d = json.load(f)
        files = {im["id"]: im["file_name"] for im in d["images"]}
        by_image: dict[int, list[str]] = {}
        for a in sorted(d["annotations"], key=lambda a: a["id"]):
            by_image.setdefault(a["image_id"], []).append(a["caption"])
    except (ValueError, KeyError, TypeError) as e:
        raise prepare.UsageError(f"--captions {captions_json!r} is not COCO captions JSON (captions_val2014.json): "
                                 f"{type(e).__name__}: {e}") from None
    ids = sorted(i for i in by_image if i in files)
    if num_pairs > len(ids):
        raise prepare.UsageError(f"--num-pairs {num_pairs} > {len(ids)} captioned images in {captions_json}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(ids), size=num_pairs, replace=False)
    pairs = []
    for i, j in enumerate(chosen):
        iid = ids[int(j)]
        caps = by_image[iid]
        cap = caps[int(rng.integers(len(caps)))]
        pairs.append({"index": i, "image_id": iid, "caption": " ".join(cap.split()), "file_name": files[iid]})
    return pairs


def items(pairs: list[dict], images: str) -> Iterator[Item]:
    for p in pairs:
        key, extra = f"{p['index']:05d}_{p['image_id']}", {"image_id": int(p["image_id"])}
        try:
            path = confined_path(images, str(p["file_name"]))
        except UnsafePath as e:
            yield Item(key=key, skip=UNSAFE_PATH, detail=f"file_name {e}", caption=p["caption"], extra=extra)
            continue
        yield Item(key=key, path=path, caption=p["caption"], extra=extra)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.prepare_coco", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", required=True, help="annotations/captions_val2014.json")
    p.add_argument("--images", required=True, help="the val2014/ image folder")
    p.add_argument("--num-pairs", type=int, default=30000)
    p.add_argument("--seed", type=int, default=0)
    prepare.add_common_args(p, shard_size=5000)
    args = p.parse_args(argv)
    prepare.validate_common(args)
    if args.num_pairs < 1:
        raise prepare.UsageError(f"--num-pairs must be >= 1 (got {args.num_pairs})")
    cfg = prepare.image_config(args)
    if not os.path.isfile(args.captions):
        raise prepare.UsageError(f"--captions {args.captions!r} is not a file (annotations/captions_val2014.json)")
    if not os.path.isdir(args.images):
        raise prepare.UsageError(f"--images {args.images!r} is not a folder (val2014/)")
    pairs = draw_pairs(args.captions, args.num_pairs, args.seed)
    prepare.check_out(args.out)
    src = {"kind": "mscoco2014_val", "captions": os.path.abspath(args.captions),
           "images": os.path.abspath(args.images), "num_pairs": args.num_pairs, "seed": args.seed}
    m = prepare.run_prepare(items(pairs, args.images), args.out, fmt=args.format, cfg=cfg,
                            shard_size=args.shard_size, workers=args.workers, source=src, limit=args.limit,
                            progress=not args.no_progress, total=len(pairs), extra_columns={"image_id": "int"},
                            max_file_bytes=max_bytes(args.max_file_mb), extra_json={"pairs.json": pairs})
    if m["counts"]["skipped"]:
        print(f"warning: {m['counts']['skipped']} COCO images could not be used; see manifest.json")
    return m


if __name__ == "__main__":
    raise SystemExit(prepare.cli(main, "python -m data_pipeline.prepare_coco"))
