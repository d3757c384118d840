"""Input items from tarballs and folders, read in memory, in a deterministic order.

Every source is a generator of `Item`s. Tar members are read with `extractfile()` only: nothing from a tar
is ever written to disk. Members with absolute paths, `..` components, links, devices or fifos are not read
at all; they come out as items with `skip` set, so the manifest lists them.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
UNSAFE = "unsafe tar member"


@dataclass
class Item:
    """One input. Exactly one of `data` (bytes in memory) or `path` (read by the worker) is set,
    unless `skip` already says why the item cannot be used."""

    key: str
    data: bytes | None = None
    path: str | None = None
    label: int = -1
    caption: str = ""
    skip: str | None = None
    detail: str = ""
    extra: dict = field(default_factory=dict)


def unsafe_reason(m: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be read, or None if it is a plain file with a safe relative name."""
    if m.issym() or m.islnk():
        return f"link to {m.linkname!r}"
    if m.isdev() or m.isfifo():
        return "device or fifo"
    if not m.isfile():
        return "not a regular file"
    name = m.name
    if name.startswith("/") or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "path contains '..'"
    return None


def iter_tar(fileobj: IO[bytes] | None = None, path: str | None = None,
             ) -> Iterator[tuple[tarfile.TarInfo, bytes | None, str | None]]:
    """Stream a tar (path or file object): (member, bytes or None, unsafe reason or None) per non-dir member."""
    tf = tarfile.open(name=path, fileobj=fileobj, mode="r|*")
    try:
        for m in tf:
            if m.isdir():
                continue
            reason = unsafe_reason(m)
            if reason is not None:
                yield m, None, reason
                continue
            f = tf.extractfile(m)
            yield m, (f.read() if f is not None else b""), None
    finally:
        tf.close()


def stem(name: str) -> str:
    base = posixpath.basename(name.replace("\\", "/"))
    return os.path.splitext(base)[0]


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(root: str) -> list[str]:
    """Image files under `root` (recursive, hidden entries skipped), as sorted relative POSIX paths."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if not fn.startswith(".") and is_image_name(fn):
                out.append(os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/"))
    return sorted(out)


def folder_items(root: str, labels: dict[str, int] | None = None, key_prefix: str = "") -> Iterator[Item]:
    """Items for every image under `root`. With `labels`, the first path component maps to the label
    (files whose first component is not in `labels` get -1)."""
    for rel in list_images(root):
        label = -1
        if labels is not None and "/" in rel:
            label = labels.get(rel.split("/", 1)[0], -1)
        yield Item(key=key_prefix + os.path.splitext(rel)[0], path=os.path.join(root, rel), label=label)


def read_item_bytes(item: Item) -> bytes:
    if item.data is not None:
        return item.data
    with open(item.path, "rb") as f:
        return f.read()
