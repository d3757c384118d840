"""Issue #17, data side: hostile and unlucky inputs to the prepare CLIs and train_tokenizer.

Every test builds real inputs on disk (photos from scikit-image, real tars, real MDS shards) and runs the real
CLIs; process-level failures (a killed worker, a killed run, peak memory, exit codes) run in subprocesses.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import WNIDS_BY_ID, encode, make_coco, make_devkit, photos, variant
from PIL import Image

from data_pipeline import prepare_coco, prepare_folder, prepare_imagenet
from data_pipeline.prepare import UsageError, cli, out_lock
from data_pipeline.reader import ShardReader
from data_pipeline.shards import STANDARD_COLUMNS, ShardWriter
from data_pipeline.sources import subfolders
from data_pipeline.train_tokenizer import iter_shard_captions
from data_pipeline.train_tokenizer import main as train_tokenizer_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
COMMON = ["--workers", "0", "--no-progress", "--size", "32"]


def _jpeg(i: int, long_side: int = 80) -> bytes:
    return encode(variant(photos()[i % len(photos())], i, long_side), quality=90)


def _write(path, data: bytes) -> None:
    p = os.fsencode(path)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)


def _photos_folder(root, n: int, prefix: str = "img_") -> list[str]:
    names = [f"{prefix}{i:03d}" for i in range(n)]
    for i, k in enumerate(names):
        _write(os.path.join(root, k + ".jpg"), _jpeg(i))
    return names


def _keys(out) -> list[str]:
    r = ShardReader(str(out), decode_image=False)
    return [r[i]["key"] for i in range(len(r))]


def _manifest(out) -> dict:
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _py(code_or_args: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code_or_args], env=ENV, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


# ---- 1. train_tokenizer: paths from data files stay inside their folder; compressed shards read in memory --

def _mds(path: Path, n: int = 60, compression: str | None = "zstd") -> list[str]:
    from streaming import MDSWriter

    caps = [f"a photo of cat number {i} on a mat" for i in range(n)]
    with MDSWriter(out=str(path), columns={"caption": "str", "key": "str"}, compression=compression,
                   size_limit=1 << 11) as w:
        for i, c in enumerate(caps):
            w.write({"caption": c, "key": f"{i:04d}"})
    return caps


def test_train_tokenizer_reads_compressed_shards_in_memory_and_confines_paths(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    caps = _mds(shards)
    assert not list(shards.glob("*.mds")) and len(list(shards.glob("*.mds.zstd"))) > 1  # compressed only
    # no temporary folder can be made: captions must still be read (in memory, never decompressed to disk)
    (tmp_path / "no_tmp").write_text("a file, not a folder")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no_tmp"))
    assert list(iter_shard_captions(shards)) == caps
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    index = json.loads((shards / "index.json").read_text())
    outside = tmp_path / "outside" / "evil.pth"
    for name, bad in (("abs", str(outside)), ("dotdot", "../../evil2.pth"), ("dotdot_zip", None)):
        hostile = tmp_path / f"hostile_{name}"
        shutil.copytree(shards, hostile)
        idx = json.loads(json.dumps(index))
        if bad is None:
            idx["shards"][0]["zip_data"]["basename"] = "../shards/" + idx["shards"][0]["zip_data"]["basename"]
        else:
            idx["shards"][0]["raw_data"]["basename"] = bad
        (hostile / "index.json").write_text(json.dumps(idx))
        with pytest.raises(ValueError, match="refusing shard file"):
            list(iter_shard_captions(hostile))
    assert not outside.exists() and not (tmp_path / "evil2.pth").exists() and not (tmp_path / "outside").exists()
    assert os.listdir(tmp_path / "tmp") == []

    # a shard file that is a symlink to a file outside the folder is refused too (links are not followed)
    linked = tmp_path / "linked"
    shutil.copytree(shards, linked)
    z = linked / index["shards"][0]["zip_data"]["basename"]
    z.unlink()
    z.symlink_to(shards / z.name)
    with pytest.raises(ValueError, match="symlink"):
        list(iter_shard_captions(linked))

    # a decompression bomb: the index declares 4 kB, the gz shard inflates to 16 MB -> refused, bounded
    import gzip
    bomb = tmp_path / "bomb"
    shutil.copytree(shards, bomb)
    idx = json.loads(json.dumps(index))
    idx["shards"][0]["compression"] = "gz"
    (bomb / idx["shards"][0]["zip_data"]["basename"]).write_bytes(gzip.compress(bytes(16 << 20), 1))
    (bomb / "index.json").write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="decompresses to more than"):
        list(iter_shard_captions(bomb))


class _OpenOnUnpickle:
    """Unpickling this creates a file: stands for code run by a pickle column."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_train_tokenizer_refuses_manifest_escapes_and_pickle_columns(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    with ShardWriter(str(evil), columns={**STANDARD_COLUMNS, "extra": "pkl"}, shard_size=8) as w:
        for i in range(8):
            w.write({"jpg": b"", "label": -1, "caption": f"a dog {i}", "key": str(i), "orig_size": "1x1",
                     "extra": _OpenOnUnpickle(str(marker))})
    with pytest.raises(ValueError, match="'pkl'"):
        train_tokenizer_main(["--shards", str(evil), "--vocab-size", "280"])
    assert not marker.exists()  # the pickle column was never decoded

    good = tmp_path / "good" / "data"
    with ShardWriter(str(good), columns=STANDARD_COLUMNS, shard_size=8) as w:
        for i in range(8):
            w.write({"jpg": b"", "label": -1, "caption": f"secret {i}", "key": str(i), "orig_size": "1x1"})
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    m = json.loads((good / "manifest.json").read_text())
    m["shards"][0]["basename"] = "../good/data/shard.00000.mds"  # a file outside the folder
    (hostile / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="not a plain file name"):
        train_tokenizer_main(["--shards", str(hostile), "--vocab-size", "280"])
    # the CLI: one line, exit 1, no traceback
    r = _py(["-m", "data_pipeline.train_tokenizer", "--shards", str(hostile)])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("python -m data_pipeline.train_tokenizer: error: ") and r.stderr.count("\n") == 1
    assert "not a plain file name" in r.stderr


# ---- 3. prepare_coco: file_name confined to --images --------------------------------------------------------

def test_prepare_coco_refuses_file_names_outside_images(tmp_path):
    co = make_coco(str(tmp_path / "coco"), n_images=6)
    secret = tmp_path / "coco" / "secret.jpg"
    secret.write_bytes(_jpeg(9))
    d = json.loads(Path(co["captions"]).read_text())
    d["images"][0]["file_name"] = "../secret.jpg"
    d["images"][1]["file_name"] = str(secret)
    os.symlink("../secret.jpg", os.path.join(co["images"], "link.jpg"))
    d["images"][2]["file_name"] = "link.jpg"
    Path(co["captions"]).write_text(json.dumps(d))
    bad_ids = {im["id"] for im in d["images"][:3]}
    out = tmp_path / "out"
    m = prepare_coco.main(["--captions", co["captions"], "--images", co["images"], "--out", str(out),
                           "--num-pairs", "6", "--shard-size", "4", *COMMON])
    r = ShardReader(str(out), decode_image=False)
    assert sorted(r[i]["image_id"] for i in range(len(r))) == sorted(set(co["ids"]) - bad_ids)
    assert m["counts"]["skipped_by_reason"] == {"unsafe path": 3}
    details = " ".join(s["detail"] for s in m["skipped"])
    assert "'..'" in details and "absolute path" in details and "symlink" in details


# ---- 4 and 8. non-UTF-8 names and unique keys -----------------------------------------------------------

def test_non_utf8_names_and_duplicate_stems_folder(tmp_path):
    src = tmp_path / "src"
    _write(os.path.join(src, "a.jpg"), _jpeg(0))
    _write(os.path.join(src, "a.png"), encode(variant(photos()[1], 1, 80), "PNG"))
    _write(os.path.join(src, "b.jpg"), _jpeg(2))
    _write(os.path.join(os.fsencode(src), b"caf\xe9.jpg"), _jpeg(3))  # Latin-1 name
    _write(os.path.join(os.fsencode(src), b"na\xefve", b"x.jpg"), _jpeg(4))  # Latin-1 folder
    out = tmp_path / "out"
    m = prepare_folder.main(["--source", str(src), "--out", str(out), "--shard-size", "2", *COMMON])
    assert sorted(_keys(out)) == sorted(["a.jpg", "a.png", "b", "caf\\xe9", "na\\xefve/x"])
    assert m["counts"]["written"] == 5 and m["counts"]["skipped"] == 0
    assert sorted((c["key"], c["name_hex"]) for c in m["renamed_keys"]) == [
        ("caf\\xe9", b"caf\xe9".hex()), ("na\\xefve/x", b"na\xefve/x".hex())]


def test_non_utf8_names_and_duplicate_stems_imagenet_tar(tmp_path):
    wnid = "n01440764"
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        _add(tf, f"{wnid}_1.JPEG", _jpeg(0))
        _add(tf, f"{wnid}_caf\xe9.JPEG", _jpeg(1))  # stored as Latin-1 bytes
        _add(tf, f"{wnid}_1.png", encode(variant(photos()[2], 2, 80), "PNG"))  # same stem as the first
    outer = tmp_path / "ILSVRC2012_img_train.tar"
    with tarfile.open(outer, "w") as tf:
        _add(tf, f"{wnid}.tar", inner.getvalue())
    out = tmp_path / "out"
    m = prepare_imagenet.main(["--split", "train", "--source", str(outer), "--out", str(out), *COMMON])
    assert _keys(out) == [f"{wnid}_1", f"{wnid}_caf\\xe9", f"{wnid}_1~2"]
    assert m["renamed_keys"] == [
        {"key": f"{wnid}_caf\\xe9", "name_hex": f"{wnid}_caf\xe9".encode("latin-1").hex(),
         "why": "name is not valid UTF-8"},
        {"key": f"{wnid}_1~2", "duplicate_of": f"{wnid}_1", "why": "duplicate key"}]


# ---- 5. a worker killed by SIGKILL: fail fast, rerun resumes ---------------------------------------------

_KILL_WORKER = """
import os, signal, sys, time
from data_pipeline import prepare, prepare_folder, process_items
real = process_items.read_item_bytes
def read_or_die(item, cap=None):  # what the OOM killer does to the worker that holds input img_020
    if item.key == "img_020":
        time.sleep(1.0)  # (growing: the other worker finishes what it holds meanwhile)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(item, cap)
process_items.read_item_bytes = read_or_die
sys.exit(prepare.cli(prepare_folder.main, "prepare_folder", sys.argv[1:]))
"""


def test_killed_worker_fails_fast_and_rerun_resumes(tmp_path):
    src, out, ref = tmp_path / "src", tmp_path / "out", tmp_path / "ref"
    _photos_folder(src, 24)
    args = ["--source", str(src), "--shard-size", "4", "--workers", "2", "--no-progress", "--size", "32"]
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", _KILL_WORKER, *args, "--out", str(out)], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the run hung after its worker was killed")
    assert proc.returncode == 1 and time.time() - t0 < 45, stderr
    assert "worker process died" in stderr and "rerun the same command" in stderr and "Traceback" not in stderr
    assert not (out / "manifest.json").exists()

    r = _py(["-m", "data_pipeline.prepare_folder", *args, "--out", str(out)])
    assert r.returncode == 0, r.stderr
    resumed = int(r.stdout.split("resuming: ")[1].split()[0])
    assert resumed >= 1
    assert _py(["-m", "data_pipeline.prepare_folder", *args, "--out", str(ref)]).returncode == 0
    assert _manifest(out) == _manifest(ref) and _keys(out) == [f"img_{i:03d}" for i in range(24)]


# ---- 6. the source changed between the kill and the rerun ------------------------------------------------

_KILL_AFTER_TWO_SHARDS = """
import os, signal, sys
from data_pipeline import prepare, prepare_folder
real, n = prepare.write_shard, [0]
def write_then_die(*a, **k):  # SIGKILL while the third shard is being written: two shards are recorded
    n[0] += 1
    if n[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
prepare.write_shard = write_then_die
sys.exit(prepare.cli(prepare_folder.main, "prepare_folder", sys.argv[1:]))
"""


def test_resume_after_source_changed_equals_fresh_run(tmp_path):
    src, out, ref = tmp_path / "src", tmp_path / "out", tmp_path / "ref"
    _photos_folder(src, 12)
    args = ["--source", str(src), "--shard-size", "3", *COMMON]
    r = _py(["-c", _KILL_AFTER_TWO_SHARDS, *args, "--out", str(out)])
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert len(glob.glob(str(out / ".partial" / "chunk.*.json"))) == 2
    # files added between the kill and the rerun, sorting before the others: every chunk shifts
    for i in range(2):
        _write(os.path.join(src, f"aaa_new{i}.jpg"), _jpeg(20 + i))
    r = _py(["-m", "data_pipeline.prepare_folder", *args, "--out", str(out)])
    assert r.returncode == 0, r.stderr
    assert "source changed since the interrupted run" in r.stdout + r.stderr
    assert _py(["-m", "data_pipeline.prepare_folder", *args, "--out", str(ref)]).returncode == 0
    keys = _keys(out)
    assert keys == ["aaa_new0", "aaa_new1"] + [f"img_{i:03d}" for i in range(12)]  # none lost, none twice
    assert _manifest(out) == _manifest(ref)
    for s in _manifest(ref)["shards"]:
        assert (out / s["basename"]).read_bytes() == (ref / s["basename"]).read_bytes()
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))


# ---- 7. one symlink rule: links below --source are not followed, and are listed ---------------------------

def test_symlinks_below_source_are_skipped_and_listed(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    _write(os.path.join(src, "cats", "c1.jpg"), _jpeg(0))
    _write(os.path.join(src, "cats", "c2.jpg"), _jpeg(1))
    _write(os.path.join(outside, "dogs", "d1.jpg"), _jpeg(2))
    _write(os.path.join(outside, "secret.jpg"), _jpeg(3))
    os.symlink(outside / "dogs", src / "dogs")  # a class folder that is a link
    os.symlink(outside / "secret.jpg", src / "cats" / "stolen.jpg")  # a file outside --source
    os.symlink("c1.jpg", src / "cats" / "alias.jpg")  # a link inside: not followed either (no duplicates)
    out = tmp_path / "out"
    m = prepare_folder.main(["--source", str(src), "--labels-from-subfolders", "--out", str(out), *COMMON])
    assert m["classes"] == ["cats"] and subfolders(str(src)) == ["cats"]
    assert sorted(_keys(out)) == ["cats/c1", "cats/c2"]
    assert {s["key"]: s["reason"] for s in m["skipped"]} == {
        "dogs": "symlink", "cats/stolen.jpg": "symlink", "cats/alias.jpg": "symlink"}
    assert str(outside / "secret.jpg") in " ".join(s["detail"] for s in m["skipped"])
    # --source itself may be a link
    os.symlink(src, tmp_path / "src_link")
    m2 = prepare_folder.main(["--source", str(tmp_path / "src_link"), "--out", str(tmp_path / "out2"), *COMMON])
    assert m2["counts"]["written"] == 2


# ---- 9. size cap on tar members and files -------------------------------------------------------------

class _Zeros:
    def __init__(self, n: int):
        self.n = n

    def read(self, k: int = -1) -> bytes:
        k = self.n if k < 0 else min(k, self.n)
        self.n -= k
        return bytes(k)


_PEAK = """
import sys
from data_pipeline import prepare, prepare_imagenet
rc = prepare.cli(prepare_imagenet.main, "prepare_imagenet", sys.argv[1:])
# this process's own peak RSS (VmHWM starts afresh at exec; ru_maxrss would include the parent's at fork)
print("PEAK_KB", [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0])
sys.exit(rc)
"""


def test_huge_tar_member_is_skipped_unread_with_bounded_memory(tmp_path):
    big = 300 << 20  # over the default cap (256 MiB); compresses to ~1 MB
    tgz = tmp_path / "ILSVRC2012_img_val.tar.gz"
    with tarfile.open(tgz, "w:gz", compresslevel=1) as tf:
        _add(tf, "ILSVRC2012_val_00000001.JPEG", _jpeg(0))
        info = tarfile.TarInfo("ILSVRC2012_val_00000002.JPEG")
        info.size = big
        tf.addfile(info, _Zeros(big))
    assert tgz.stat().st_size < 5 << 20
    devkit = make_devkit(str(tmp_path / "devkit.tar.gz"), WNIDS_BY_ID, [1, 2])
    r = _py(["-c", _PEAK, "--split", "val", "--source", str(tgz), "--devkit", devkit, "--out",
             str(tmp_path / "out"), *COMMON])
    assert r.returncode == 0, r.stderr
    peak_mb = int(r.stdout.split("PEAK_KB")[1].split()[0]) / 1024
    assert peak_mb < 250, f"peak RSS {peak_mb:.0f} MB: the 300 MiB member was read"
    m = _manifest(tmp_path / "out")
    assert m["counts"]["written"] == 1
    assert [(s["key"], s["reason"]) for s in m["skipped"]] == [("ILSVRC2012_val_00000002.JPEG", "file too large")]
    assert "--max-file-mb 256" in m["skipped"][0]["detail"]

    # the same cap for files in a folder, and the flag moves it
    src = tmp_path / "src"
    _photos_folder(src, 2)
    _write(os.path.join(src, "big.jpg"), _jpeg(5) + bytes(3 << 20))
    m = prepare_folder.main(["--source", str(src), "--out", str(tmp_path / "f1"), "--max-file-mb", "2", *COMMON])
    assert {s["key"]: s["reason"] for s in m["skipped"]} == {"big": "file too large"}
    m = prepare_folder.main(["--source", str(src), "--out", str(tmp_path / "f2"), "--max-file-mb", "8", *COMMON])
    assert m["counts"]["written"] == 3


# ---- 10. --max-pixels above PIL's own limit -------------------------------------------------------------

def test_max_pixels_above_pil_default_is_honoured(tmp_path, monkeypatch):
    # PIL's own default (a preprocess call earlier in this process may have raised it); restored after the test
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1024 * 1024 * 1024 // 4 // 3)
    side = 9500  # 90.25 M pixels: above PIL's 89.48 M default, below our default 178.96 M
    assert Image.MAX_IMAGE_PIXELS < side * side < 178_956_970
    grad = np.linspace(0, 255, side, dtype=np.float32).astype(np.uint8)
    im = Image.fromarray(np.broadcast_to(grad, (side, side)).copy(), "L")
    src = tmp_path / "src"
    src.mkdir()
    im.save(src / "huge.jpg", quality=30)
    del im
    m = prepare_folder.main(["--source", str(src), "--out", str(tmp_path / "default"), *COMMON])
    assert m["counts"]["written"] == 1, m["skipped"]
    m = prepare_folder.main(["--source", str(src), "--out", str(tmp_path / "high"), "--max-pixels", "100000000",
                             *COMMON])
    assert m["counts"]["written"] == 1, m["skipped"]
    m = prepare_folder.main(["--source", str(src), "--out", str(tmp_path / "low"), "--max-pixels", "50000000",
                             *COMMON])
    assert [s["reason"] for s in m["skipped"]] == ["decompression bomb"]
    assert "max_pixels=50000000" in m["skipped"][0]["detail"]


# ---- 11. one run per --out: a lock that names its holder ---------------------------------------------------

def test_second_run_on_same_out_is_refused_naming_the_holder(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _photos_folder(src, 3)
    out.mkdir()
    args = ["-m", "data_pipeline.prepare_folder", "--source", str(src), "--out", str(out), *COMMON]
    with out_lock(str(out)):  # what a running prepare holds
        r = _py(args)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"pid {os.getpid()}" in r.stderr and "another prepare run" in r.stderr
        assert not (out / ".partial").exists()  # it did nothing
    r = _py(args)
    assert r.returncode == 0, r.stderr
    assert not (out / ".lock").exists() and _manifest(out)["counts"]["written"] == 3


# ---- 12. a devkit with a single synset -------------------------------------------------------------------

def test_read_devkit_single_synset(tmp_path):
    devkit = make_devkit(str(tmp_path / "devkit.tar.gz"), ["n01440764"], [1, 1], non_leaf=False)
    assert prepare_imagenet.read_devkit(devkit) == (["n01440764"], ["n01440764", "n01440764"])
    val = tmp_path / "val"
    for i in range(2):
        _write(os.path.join(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG"), _jpeg(i))
    m = prepare_imagenet.main(["--split", "val", "--source", str(val), "--devkit", devkit,
                               "--out", str(tmp_path / "out"), *COMMON])
    assert m["classes"] == ["n01440764"] and m["counts"]["written"] == 2


# ---- 17. prepare CLIs: arguments checked first, one line, exit 2 (usage) or 1 (runtime) -----------------------

def test_prepare_cli_misuse_one_line_and_exit_codes(tmp_path):
    src = tmp_path / "src"
    _photos_folder(src, 2)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "notes.tar").write_text("these are notes, not a tar\n" * 40)
    devkit = make_devkit(str(tmp_path / "devkit.tar.gz"), WNIDS_BY_ID, [1, 2])
    out = str(tmp_path / "out")
    folder = ["-m", "data_pipeline.prepare_folder", "--source", str(src), "--no-progress"]
    cases = [
        (folder + ["--out", out, "--size", "0"], "--size"),
        (folder + ["--out", out, "--jpeg-quality", "0"], "--jpeg-quality"),
        (folder + ["--out", out, "--shard-size", "0"], "--shard-size"),
        (folder + ["--out", out, "--workers", "-3"], "--workers"),
        (folder + ["--out", str(tmp_path / "afile" / "out")], "--out"),
        (["-m", "data_pipeline.prepare_imagenet", "--split", "val", "--source", str(src), "--devkit",
          str(tmp_path / "missing.tar.gz"), "--out", out], "--devkit"),
        (["-m", "data_pipeline.prepare_imagenet", "--split", "train", "--source", str(tmp_path / "notes.tar"),
          "--out", out], "not a tar archive"),
        (["-m", "data_pipeline.prepare_cc", "--source", str(tmp_path), "--out", out], "not a tar archive"),
        (["-m", "data_pipeline.prepare_coco", "--captions", str(tmp_path / "afile"), "--images", str(src),
          "--out", out], "--captions"),
    ]
    for argv, names in cases:
        r = _py(argv)
        assert r.returncode == 2, (argv, r.returncode, r.stderr)
        assert r.stderr.startswith(f"python -m {argv[1]}: error: ") and r.stderr.count("\n") == 1, (argv, r.stderr)
        assert names in r.stderr, (argv, r.stderr)
        assert not os.path.exists(out), f"{argv}: work started before the arguments were checked"

    # a runtime error (a tar cut short mid-stream): one line, exit 1; --debug adds the traceback
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tf:
        for i in range(3):
            _add(tf, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(i))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.getvalue()[:len(whole.getvalue()) // 2])
    argv = ["-m", "data_pipeline.prepare_imagenet", "--split", "val", "--source", str(cut), "--devkit", devkit,
            "--out", str(tmp_path / "o1"), "--workers", "0", "--no-progress", "--size", "32"]
    r = _py(argv)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("python -m data_pipeline.prepare_imagenet: error: ") and "--debug" in r.stderr
    r = _py(argv + ["--debug"])
    assert r.returncode == 1 and "Traceback" in r.stderr and ": error: " in r.stderr.rstrip().splitlines()[-1]
    # the library entry point raises a typed error instead of exiting
    with pytest.raises(UsageError, match="--workers"):
        prepare_folder.main(["--source", str(src), "--out", out, "--workers", "-3"])
    assert cli(prepare_folder.main, "prepare_folder", ["--source", str(src), "--out", out, "--workers", "-3"]) == 2


def test_peak_rss_probe_is_meaningful():
    """The peak-memory figure used above is the child's own: a child that reads 300 MB reports it, a child that
    does not reports little, even when started from this (torch-sized) process."""
    probe = _PEAK.split("print(", 1)[1].rsplit(")", 1)[0]
    for alloc, low, high in (("b = b\"x\" * (300 << 20)", 300, 10_000), ("", 0, 200)):
        r = _py(["-c", f"{alloc}\nprint({probe})"])
        assert low < int(r.stdout.split()[1]) / 1024 < high, r.stdout
