"""Input items from tarballs and folders, read in memory, in a deterministic order.

Every source is a generator of `Item`s. Tar members are read with `extractfile()` only: nothing from a tar
is ever written to disk. Members with absolute paths, `..` components, links, devices or fifos are not read
at all; they come out as items with `skip` set, so the manifest lists them. A member (or a file) larger
than the size cap (`--max-file-mb`, default 256 MiB) is not read either: it is skipped with reason
"file too large".

Paths and links, one rule everywhere (folder walks, paths named in data files such as COCO's `file_name`
or a shard folder's `index.json`, tar members): **a symbolic link below a root is never followed.** The root
itself (`--source`, `--images`, the shard folder) may be a link; below it, a linked file or folder met by a
walk is skipped and listed with reason "symlink" (and where it points), and a path named in a data file must
be relative, without `..`, and must not pass through a link (`confined_path`). So nothing outside the root is
ever read, walks cannot loop, and no image is ingested twice under two names.

Keys: file names that are not valid UTF-8 (a Latin-1 `café.jpg` on disk or in a tar) get their undecodable
bytes written as `\\xNN` in the key (`escape_name`); `data_pipeline.prepare` records the original bytes in
the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
UNSAFE = "unsafe tar member"
UNSAFE_PATH = "unsafe path"
SYMLINK = "symlink"
TOO_LARGE = "file too large"
NOT_WANTED = "not wanted"  # iter_tar: a member its caller has no use for, passed over unread
DEFAULT_MAX_FILE_MB = 256


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


def escape_name(name: str) -> tuple[str, str | None]:
    """(UTF-8-encodable name, hex of the original bytes or None if the name was already valid UTF-8).

    Names of files and tar members that are not valid UTF-8 reach Python with their undecodable bytes as
    surrogates (`os.fsdecode`, tarfile's "surrogateescape"); those bytes become the text `\\xNN`."""
    try:
        name.encode("utf-8")
        return name, None
    except UnicodeEncodeError:
        pass
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # lone surrogates that are not escaped bytes
        raw = name.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace"), raw.hex()


class UnsafePath(ValueError):
    """A path taken from a data file that is absolute, contains `..` or passes through a symlink."""

    def __init__(self, rel: str, why: str):
        super().__init__(f"{escape_name(rel)[0]!r}: {why}")
        self.why = why


def _lexical_reason(rel: str) -> str | None:
    if not rel or "\x00" in rel:
        return "empty name or NUL byte"
    if rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        return "absolute path"
    if ".." in rel.replace("\\", "/").split("/"):
        return "path contains '..'"
    return None


def confined_path(root: str, rel: str) -> str:
    """`root/rel` for a relative path `rel` read from a data file, after checking that it stays inside `root`:
    no absolute path, no `..`, and (resolving it) no symlink anywhere below `root`. Raises UnsafePath."""
    why = _lexical_reason(rel)
    if why is not None:
        raise UnsafePath(rel, why)
    path = os.path.join(root, rel)
    real_root = os.path.realpath(root)
    if os.path.realpath(path) != os.path.normpath(os.path.join(real_root, rel)):
        raise UnsafePath(rel, f"passes through a symlink (resolves to {os.path.realpath(path)!r}); links below "
                         f"{root!r} are not followed")
    return path


def unsafe_reason(m: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be read, or None if it is a plain file with a safe relative name."""
    if m.issym() or m.islnk():
        return f"link to {m.linkname!r}"
    if m.isdev() or m.isfifo():
        return "device or fifo"
    if not m.isfile():
        return "not a regular file"
    return _lexical_reason(m.name)


def max_bytes(max_file_mb: float | None) -> int | None:
    return None if max_file_mb is None else int(max_file_mb * (1 << 20))


def _too_large(size: int, cap: int | None) -> str | None:
    if cap is not None and size > cap:
        return f"{size} bytes > --max-file-mb {cap / (1 << 20):g}"
    return None


def iter_tar(fileobj: IO[bytes] | None = None, path: str | None = None, max_member_bytes: int | None = None,
             wanted: Callable[[str], bool | int] | None = None,
             ) -> Iterator[tuple[tarfile.TarInfo, bytes | None, str | None]]:
    """Stream a tar (path or file object): (member, bytes or None, skip reason or None) per non-dir member.

    Unsafe members (reason: see `unsafe_reason`) and members over `max_member_bytes` (reason starts with
    TOO_LARGE) are not read; the stream moves past them without holding their bytes. With `wanted` (called
    with the member's name), a member it answers False for is not read either (reason NOT_WANTED), and an
    int answer is that member's own byte cap (a member over it: TOO_LARGE, as over `max_member_bytes`)."""
    tf = tarfile.open(name=path, fileobj=fileobj, mode="r|*")
    try:
        for m in tf:
            if m.isdir():
                continue
            reason = unsafe_reason(m)
            if reason is not None:
                yield m, None, reason
                continue
            want = True if wanted is None else wanted(m.name)
            if want is False:
                yield m, None, NOT_WANTED
                continue
            big = _too_large(m.size, max_member_bytes)
            if big is None and want is not True and m.size > want:
                big = f"{m.size} bytes > {want} bytes, the cap for this kind of member"
            if big is not None:
                yield m, None, f"{TOO_LARGE}: {big}"
                continue
            f = tf.extractfile(m)
            yield m, (f.read() if f is not None else b""), None
    finally:
        tf.close()


def tar_skip(key: str, reason: str) -> Item:
    """The skipped Item for a member that `iter_tar` did not read."""
    if reason.startswith(TOO_LARGE):
        return Item(key=key, skip=TOO_LARGE, detail=reason[len(TOO_LARGE) + 2:])
    return Item(key=key, skip=UNSAFE, detail=reason)


def stem(name: str) -> str:
    base = posixpath.basename(name.replace("\\", "/"))
    return os.path.splitext(base)[0]


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def subfolders(root: str) -> list[str]:
    """Sorted names of the non-hidden folders directly in `root`; links are not folders (module docstring)."""
    return sorted(e.name for e in os.scandir(root)
                  if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))


def walk_images(root: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(image files under `root`, recursive, as sorted relative POSIX paths; entries passed over, as sorted
    (relative path, reason, detail)). Hidden entries are ignored; links to files and folders are not followed
    (reason SYMLINK, detail: where they point); a folder that cannot be listed is passed over too."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    images: list[str] = []
    passed: list[tuple[str, str, str]] = []

    def visit(d: str, rel: str) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            if not rel:
                raise
            passed.append((rel.rstrip("/"), "unreadable folder", e.strerror or str(e)))
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            r = f"{rel}{e.name}"
            if e.is_symlink():
                if e.is_dir() or is_image_name(e.name):
                    passed.append((r, SYMLINK, f"-> {escape_name(os.readlink(e.path))[0]} (not followed)"))
            elif e.is_dir(follow_symlinks=False):
                visit(e.path, r + "/")
            elif e.is_file(follow_symlinks=False) and is_image_name(e.name):
                images.append(r)

    visit(root, "")
    return sorted(images), sorted(passed)


def list_images(root: str) -> list[str]:
    """Image files under `root` (recursive, hidden entries and symlinks skipped), as sorted relative POSIX paths."""
    return walk_images(root)[0]


def folder_keys(rels: list[str]) -> dict[str, str]:
    """relative path -> key: the path without its extension, or with it where two files share the stem
    (`a.jpg` and `a.png` in one folder give keys `a.jpg` and `a.png`, a lone `b.jpg` gives `b`)."""
    stems = Counter(os.path.splitext(r)[0] for r in rels)
    return {r: (os.path.splitext(r)[0] if stems[os.path.splitext(r)[0]] == 1 else r) for r in rels}


def folder_items(root: str, labels: dict[str, int] | None = None, key_prefix: str = "") -> Iterator[Item]:
    """Items for every image under `root`, and a skipped item for every entry passed over (a link: reason
    "symlink"; a folder that cannot be listed). With `labels`, the first path component maps to the label
    (files whose first component is not in `labels` get -1)."""
    images, passed = walk_images(root)
    keys = folder_keys(images)
    entries = sorted([(r, None, "") for r in images] + passed)
    for rel, reason, detail in entries:
        if reason is not None:
            yield Item(key=key_prefix + rel, skip=reason, detail=detail)
            continue
        label = -1
        if labels is not None and "/" in rel:
            label = labels.get(rel.split("/", 1)[0], -1)
        yield Item(key=key_prefix + keys[rel], path=os.path.join(root, rel), label=label)


class FileTooLarge(OSError):
    """A file over the size cap (`--max-file-mb`)."""


def read_item_bytes(item: Item, max_file_bytes: int | None = None) -> bytes:
    """The item's bytes. A file over `max_file_bytes` raises FileTooLarge instead of being read."""
    if item.data is not None:
        return item.data
    with open(item.path, "rb") as f:
        big = _too_large(os.fstat(f.fileno()).st_size, max_file_bytes)
        if big is not None:
            raise FileTooLarge(big)
        return f.read()


def item_fingerprint(item: Item) -> bytes:
    """Identity of an item's input and of everything it contributes to a shard: key, label, caption,
    extras, skip reason, and its bytes (sha256 of `data`) or, for a file, its size and mtime."""
    if item.data is not None:
        content = hashlib.sha256(item.data).hexdigest()
    elif item.path is not None:
        try:
            st = os.stat(item.path)
            content = f"file {st.st_size} {st.st_mtime_ns}"
        except OSError as e:
            content = f"unreadable {e.errno}"
    else:
        content = None
    desc = [item.key, item.label, item.caption, item.skip, item.detail, content,
            json.dumps(item.extra, sort_keys=True, default=str)]
    return hashlib.sha256(json.dumps(desc).encode("utf-8", "surrogatepass")).digest()
