"""Any folder tree of images -> shards (how users bring their own data).

    python -m data_pipeline.prepare_folder --source photos/ --out data/photos256
    python -m data_pipeline.prepare_folder --source pets/ --labels-from-subfolders --out data/pets256

Images are found recursively (extensions: .jpg .jpeg .png .webp .bmp .gif .tif .tiff .ppm .pgm .pbm; hidden
entries skipped) in sorted order. Keys are relative paths without extension. With --labels-from-subfolders,
each first-level subfolder is a class (sorted names -> 0, 1, ...; files at the top get -1); the class
names are recorded in the manifest.
"""

from __future__ import annotations

import argparse
import os

from data_pipeline.prepare import add_common_args, image_config, run_prepare
from data_pipeline.sources import folder_items, list_images


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.prepare_folder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="folder of images (searched recursively)")
    p.add_argument("--labels-from-subfolders", action="store_true", help="first-level subfolder = class")
    p.add_argument("--min-size", type=int, default=0, help="skip images whose shorter side is smaller")
    add_common_args(p)
    args = p.parse_args(argv)
    if not os.path.isdir(args.source):
        raise SystemExit(f"error: --source {args.source!r} is not a folder")
    classes = None
    labels = None
    if args.labels_from_subfolders:
        classes = sorted(d for d in os.listdir(args.source)
                         if os.path.isdir(os.path.join(args.source, d)) and not d.startswith("."))
        if not classes:
            raise SystemExit(f"error: {args.source} has no subfolders to take labels from")
        labels = {c: i for i, c in enumerate(classes)}
    n = len(list_images(args.source))
    if n == 0:
        raise SystemExit(f"error: no image files under {args.source}")
    source = {"kind": "folder", "path": os.path.abspath(args.source),
              "labels_from_subfolders": args.labels_from_subfolders}
    return run_prepare(folder_items(args.source, labels), args.out, fmt=args.format,
                       cfg=image_config(args, min_size=args.min_size), shard_size=args.shard_size,
                       workers=args.workers, source=source, limit=args.limit, progress=not args.no_progress,
                       total=n, manifest_extra={"classes": classes} if classes else None)


if __name__ == "__main__":
    main()
