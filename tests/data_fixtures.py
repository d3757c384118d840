"""Test inputs built at test time from the real photographs that ship with scikit-image (no binaries in git).

`make_imagenet(root)` writes miniature copies of the official layouts: `ILSVRC2012_img_train.tar` (a tar of
per-class tars), `ILSVRC2012_img_val.tar` (flat) and `ILSVRC2012_devkit_t12.tar.gz` (meta.mat + val ground
truth), plus the extracted `train/` and `val/` folders, and a "bad input" set inside the train tar.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Devkit ids deliberately not in sorted-wnid order, so a wrong mapping shows up as wrong labels.
WNIDS_BY_ID = ["n01484850", "n01440764", "n01443537"]  # ILSVRC2012_ID 1, 2, 3
SORTED_WNIDS = sorted(WNIDS_BY_ID)


@functools.lru_cache(maxsize=1)
def photos() -> list[np.ndarray]:
    """Real colour photos (H, W, 3) uint8 of varied sizes from skimage.data."""
    from skimage import data

    out = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry()]
    return [np.ascontiguousarray(a[..., :3]) for a in out]


@functools.lru_cache(maxsize=1)
def grey_photo() -> np.ndarray:
    from skimage import data

    return data.camera()


def encode(arr: np.ndarray | Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def variant(arr: np.ndarray, i: int, long_side: int | None = None) -> np.ndarray:
    """A distinct image per i: a crop of the photo, optionally resized (ImageNet-like sizes)."""
    h, w = arr.shape[:2]
    dy, dx = (i * 7) % max(1, h // 8), (i * 13) % max(1, w // 8)
    a = arr[dy:h - (i % 3) * 5, dx:w - (i % 2) * 9]
    if long_side:
        im = Image.fromarray(a)
        s = long_side / max(im.size)
        a = np.asarray(im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC))
    return np.ascontiguousarray(a)


def photo_shards(root: Path, n: int, shard_size: int, out_name: str = "mds") -> Path:
    """n distinct photo crops (JPEG, long side 96) under root/photos, prepared as 64x64 MDS shards of `shard_size`
    samples in root/out_name by the real `python -m data_pipeline.prepare_folder`. Returns the shard folder."""
    src, out = root / "photos", root / out_name
    src.mkdir(parents=True)
    ps = photos()
    for i in range(n):
        (src / f"img_{i:03d}.jpg").write_bytes(encode(variant(ps[i % len(ps)], i, long_side=96)))
    subprocess.run([sys.executable, "-m", "data_pipeline.prepare_folder", "--source", str(src), "--out", str(out),
                    "--size", "64", "--workers", "0", "--shard-size", str(shard_size), "--no-progress"],
                   cwd=Path(__file__).resolve().parents[1], check=True, timeout=120, capture_output=True)
    return out


def write_shards(path: str, fmt: str, n: int = 64, shard_size: int = 8, size: int = 32) -> str:
    """n distinct photo crops resized to size x size, as JPEG shards (`fmt` "mds" or "wds") written directly by the
    project's ShardWriter (labels i % 7, captions, keys). Returns `path`."""
    from data_pipeline.shards import STANDARD_COLUMNS, ShardWriter

    p = photos()
    with ShardWriter(path, dict(STANDARD_COLUMNS), fmt=fmt, shard_size=shard_size, source={"kind": "test"}) as w:
        for i in range(n):
            img = np.asarray(Image.fromarray(variant(p[i % 5], i)).resize((size, size)))
            w.write({"jpg": encode(img), "label": i % 7, "caption": f"c{i}", "key": f"k{i:03d}",
                     "orig_size": f"{size}x{size}"})
    return path


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A tiny valid PNG whose header claims width x height (IHDR rewritten with a correct CRC)."""
    raw = bytearray(encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
    ihdr = 8 + 8  # signature + length + type
    raw[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(raw[12:12 + 4 + 13])) & 0xFFFFFFFF
    raw[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(raw)


@functools.lru_cache(maxsize=1)
def bad_inputs() -> dict[str, tuple[bytes, str | None]]:
    """name -> (file bytes, expected skip reason or None for a valid image that must be kept)."""
    p = photos()
    good = encode(p[1])
    cmyk = encode(Image.fromarray(p[0]).convert("CMYK"), "JPEG", quality=90)
    pal = Image.fromarray(p[2]).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.info["transparency"] = 0
    grey16 = Image.fromarray(grey_photo().astype(np.uint16) * 257)  # mode I;16
    rotated = Image.fromarray(p[3])
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    return {
        "bad_truncated.JPEG": (good[: len(good) // 2], "truncated image"),
        "bad_empty.JPEG": (b"", "empty file"),
        "bad_text.JPEG": (b"this is not an image\n" * 20, "not an image"),
        "bad_bomb.JPEG": (bomb_png(), "decompression bomb"),
        "ok_png_named_jpeg.JPEG": (encode(p[4][:300, :400], "PNG"), None),
        "ok_cmyk.JPEG": (cmyk, None),
        "ok_grey.JPEG": (encode(grey_photo()), None),
        "ok_palette_alpha.JPEG": (encode(pal, "PNG"), None),
        "ok_grey16.JPEG": (encode(grey16, "PNG"), None),
        "ok_exif_rotated.JPEG": (encode(rotated, "JPEG", exif=exif.tobytes()), None),
    }


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tf.addfile(info, io.BytesIO(data))


def _tar_bytes(members: list[tuple[str, bytes]], evil: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            _add(tf, name, data)
        if evil:
            _add(tf, "../../evil", b"owned")
            _add(tf, "/tmp/evil_abs", b"owned")
            link = tarfile.TarInfo("evil_link")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(link)
    return buf.getvalue()


def _meta_mat(wnids_by_id: list[str] = WNIDS_BY_ID, non_leaf: bool = True) -> bytes:
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "wordnet_height", "num_train_images"]
    rows = [(i + 1, w, f"class {w}", "", 0, 0, 10) for i, w in enumerate(wnids_by_id)]
    if non_leaf:
        rows.append((1001, "n00001740", "entity", "", 3, 10, 0))  # a non-leaf synset must be ignored
    arr = np.zeros((len(rows), 1), dtype=[(f, "O") for f in fields])
    for i, r in enumerate(rows):
        for f, v in zip(fields, r):
            arr[i, 0][f] = np.array(v)
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": arr})
    return buf.getvalue()


def make_imagenet(root: str, per_class: int = 4, n_val: int = 6, with_bad: bool = True,
                  long_side: int | None = None) -> dict:
    """Write the miniature ImageNet layouts under `root`; return paths and the expected outcome."""
    os.makedirs(root, exist_ok=True)
    p = photos()
    expected_train: dict[str, int] = {}  # key -> label for every valid image
    expected_skips: dict[str, str] = {}
    inner = []
    for ci, wnid in enumerate(SORTED_WNIDS):
        members = []
        for j in range(per_class):
            name = f"{wnid}_{j + 1}.JPEG"
            members.append((name, encode(variant(p[(ci + j) % len(p)], ci * 10 + j, long_side), quality=90)))
            expected_train[f"{wnid}_{j + 1}"] = ci
        if with_bad and ci == 0:
            for name, (data, reason) in bad_inputs().items():
                members.append((f"{wnid}_{name}", data))
                key = f"{wnid}_{name[:-5]}"
                if reason is None:
                    expected_train[key] = ci
                else:
                    expected_skips[key] = reason
        inner.append((wnid, members))
    for wnid, members in inner:
        d = os.path.join(root, "train", wnid)
        os.makedirs(d, exist_ok=True)
        for name, data in members:
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
    with tarfile.open(os.path.join(root, "ILSVRC2012_img_train.tar"), "w") as tf:
        for k, (wnid, members) in enumerate(inner):
            _add(tf, f"{wnid}.tar", _tar_bytes(members, evil=with_bad and k == 1))
        if with_bad:
            _add(tf, "../../evil", b"owned")
    if with_bad:
        expected_skips.update({"../../evil": "unsafe tar member", f"{SORTED_WNIDS[1]}.tar/../../evil":
                               "unsafe tar member", f"{SORTED_WNIDS[1]}.tar//tmp/evil_abs": "unsafe tar member",
                               f"{SORTED_WNIDS[1]}.tar/evil_link": "unsafe tar member"})

    gt_ids, val_members, expected_val = [], [], {}
    os.makedirs(os.path.join(root, "val"), exist_ok=True)
    for i in range(n_val):
        dev_id = i % len(WNIDS_BY_ID) + 1
        gt_ids.append(dev_id)
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        data = encode(variant(p[i % len(p)], 100 + i, long_side), quality=90)
        val_members.append((name, data))
        with open(os.path.join(root, "val", name), "wb") as f:
            f.write(data)
        expected_val[name[:-5]] = SORTED_WNIDS.index(WNIDS_BY_ID[dev_id - 1])
    with open(os.path.join(root, "ILSVRC2012_img_val.tar"), "wb") as f:
        f.write(_tar_bytes(val_members))
    make_devkit(os.path.join(root, "ILSVRC2012_devkit_t12.tar.gz"), WNIDS_BY_ID, gt_ids)
    return {"train_tar": os.path.join(root, "ILSVRC2012_img_train.tar"),
            "val_tar": os.path.join(root, "ILSVRC2012_img_val.tar"),
            "devkit": os.path.join(root, "ILSVRC2012_devkit_t12.tar.gz"),
            "train_dir": os.path.join(root, "train"), "val_dir": os.path.join(root, "val"),
            "train": expected_train, "skips": expected_skips, "val": expected_val}


def make_devkit(path: str, wnids_by_id: list[str], gt_ids: list[int], non_leaf: bool = True) -> str:
    """ILSVRC2012_devkit_t12.tar.gz: meta.mat (leaf synsets with ILSVRC2012_ID 1.. in the given order, plus a
    non-leaf one) and the val ground truth (one ILSVRC2012_ID per val image)."""
    gt = ("\n".join(map(str, gt_ids)) + "\n").encode()
    with tarfile.open(path, "w:gz") as tf:
        _add(tf, "ILSVRC2012_devkit_t12/data/meta.mat", _meta_mat(wnids_by_id, non_leaf))
        _add(tf, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", gt)
    return path


def make_cc(root: str, n: int = 8) -> dict:
    """img2dataset-style output: two tars with {key}.jpg/.txt/.json, plus a TSV of caption<TAB>path."""
    import json

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    p = photos()
    captions, tsv = {}, []
    for t in range(2):
        members = []
        for j in range(n // 2):
            i = t * (n // 2) + j
            key = f"{t:05d}{j:04d}"
            cap = f"  a  photo\tnumber {i}  " if i != 3 else "   "
            members += [(f"{key}.jpg", encode(variant(p[i % len(p)], i))), (f"{key}.txt", cap.encode()),
                        (f"{key}.json", json.dumps({"key": key, "caption": cap}).encode())]
            captions[key] = " ".join(cap.split())
            fn = f"img{i}.jpg"
            with open(os.path.join(root, "images", fn), "wb") as f:
                f.write(encode(variant(p[i % len(p)], i)))
            tsv.append(f"{cap.strip() or ' '}\timages/{fn}")
        with open(os.path.join(root, f"{t:05d}.tar"), "wb") as f:
            f.write(_tar_bytes(members))
    with open(os.path.join(root, "cc.tsv"), "w") as f:
        f.write("\n".join(tsv) + "\n")
    return {"dir": root, "tsv": os.path.join(root, "cc.tsv"), "captions": captions}


def make_coco(root: str, n_images: int = 6, caps_per_image: int = 3) -> dict:
    import json

    os.makedirs(os.path.join(root, "val2014"), exist_ok=True)
    p = photos()
    images, anns = [], []
    for i in range(n_images):
        iid = 1000 + i * 7
        fn = f"COCO_val2014_{iid:012d}.jpg"
        with open(os.path.join(root, "val2014", fn), "wb") as f:
            f.write(encode(variant(p[i % len(p)], i)))
        images.append({"id": iid, "file_name": fn})
        for c in range(caps_per_image):
            anns.append({"id": len(anns) + 1, "image_id": iid, "caption": f"image {iid} caption {c}"})
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    path = os.path.join(root, "annotations", "captions_val2014.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    return {"captions": path, "images": os.path.join(root, "val2014"), "ids": [im["id"] for im in images]}
