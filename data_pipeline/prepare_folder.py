"""Any folder tree of images -> shards (how users bring their own data).

    python -m data_pipeline.prepare_folder --source photos/ --out data/photos256
    python -m data_pipeline.prepare_folder --source pets/ --labels-from-subfolders --out data/pets256

Images are found recursively (extensions: .jpg .jpeg .png .webp .bmp .gif .tif .tiff .ppm .pgm .pbm; hidden
entries skipped) in sorted order. Keys are relative paths without extension (with it where two files share
a stem: `a.jpg` and `a.png` give keys `a.jpg` and `a.png`). Symbolic links below --source are not followed:
linked files and folders are skipped and listed in the manifest with reason "symlink" (--source itself may
be a link). With --labels-from-subfolders, each first-level subfolder (not a link) is a class (sorted
names -> 0, 1, ...; files at the top get -1); the class names are recorded in the manifest.
"""

from __future__ import annotations

import argparse
import os

from data_pipeline import prepare
from data_pipeline.sources import folder_items, max_bytes, subfolders, walk_images


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.prepare_folder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="folder of images (searched recursively)")
    p.add_argument("--labels-from-subfolders", action="store_true", help="first-level subfolder = class")
    p.add_argument("--min-size", type=int, default=0, help="skip images whose shorter side is smaller")
    prepare.add_common_args(p)
    args = p.parse_args(argv)
    prepare.validate_common(args)
    cfg = prepare.image_config(args, min_size=args.min_size)
    if not os.path.isdir(args.source):
        raise prepare.UsageError(f"--source {args.source!r} is not a folder")
    classes = None
    labels = None
    if args.labels_from_subfolders:
        classes = subfolders(args.source)
        if not classes:
            raise prepare.UsageError(f"--source {args.source!r} has no subfolders to take labels from")
        labels = {c: i for i, c in enumerate(classes)}
    images, passed = walk_images(args.source)
    if not images:
        raise prepare.UsageError(f"no image files under --source {args.source!r}" +
                                 (f" ({len(passed)} symlink(s) or unreadable folder(s) passed over)" if passed else ""))
    prepare.check_out(args.out)
    source = {"kind": "folder", "path": os.path.abspath(args.source),
              "labels_from_subfolders": args.labels_from_subfolders}
    return prepare.run_prepare(folder_items(args.source, labels), args.out, fmt=args.format, cfg=cfg,
                               shard_size=args.shard_size, workers=args.workers, source=source, limit=args.limit,
                               progress=not args.no_progress, total=len(images) + len(passed),
                               manifest_extra={"classes": classes} if classes else None,
                               max_file_bytes=max_bytes(args.max_file_mb))


if __name__ == "__main__":
    raise SystemExit(prepare.cli(main, "python -m data_pipeline.prepare_folder"))
