"""prepare_* CLIs on miniature copies of the official layouts (built from scikit-image photos)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from data_fixtures import SORTED_WNIDS, make_cc, make_coco, make_imagenet

from data_pipeline import prepare_cc, prepare_coco, prepare_folder, prepare_imagenet
from data_pipeline.prepare import UsageError
from data_pipeline.reader import ShardReader, copy_with_extra_column
from data_pipeline.shards import STANDARD_COLUMNS
from divae.utils.files import sha256_file

COMMON = ["--shard-size", "5", "--workers", "1", "--no-progress", "--size", "64"]


@pytest.fixture(scope="module")
def imnet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return make_imagenet(str(root))


def _samples(path):
    r = ShardReader(path)
    return [r[i] for i in range(len(r))]


def test_imagenet_train_tar(imnet, tmp_path):
    out = str(tmp_path / "out")
    m = prepare_imagenet.main(["--split", "train", "--source", imnet["train_tar"], "--out", out, *COMMON])
    got = {s["key"]: s["label"] for s in _samples(out)}
    assert got == imnet["train"]  # every valid image, with its sorted-synset label
    skipped = {s["key"]: s["reason"] for s in m["skipped"]}
    assert skipped == imnet["skips"]  # every bad input, with the right reason
    assert m["counts"] == {"inputs": len(got) + len(skipped), "written": len(got), "skipped": len(skipped),
                           "skipped_by_reason": m["counts"]["skipped_by_reason"]}
    assert m["classes"] == SORTED_WNIDS and m["preprocessing"]["jpeg_quality"] == 95
    for s in m["shards"]:
        assert sha256_file(os.path.join(out, s["basename"])) == s["sha256"]
    # nothing from the tar was written anywhere: only shards and json in out, no 'evil' anywhere
    assert sorted(os.listdir(out)) == sorted(["index.json", "manifest.json"] + [s["basename"] for s in m["shards"]])
    for base in (str(tmp_path), os.path.dirname(imnet["train_tar"]), os.path.dirname(os.path.dirname(out))):
        for dirpath, _, files in os.walk(base):
            assert not any("evil" in f for f in files), dirpath
    assert not os.path.exists("/tmp/evil_abs")
    s0 = _samples(out)[0]
    assert s0["image"].shape == (64, 64, 3) and s0["image"].dtype == np.uint8
    assert set(s0) >= set(STANDARD_COLUMNS) and "x" in s0["orig_size"] and s0["caption"] == ""
    # a complete output is left alone; other settings are refused
    assert prepare_imagenet.main(["--split", "train", "--source", imnet["train_tar"], "--out", out, *COMMON]) == m
    with pytest.raises(UsageError, match="other settings"):
        prepare_imagenet.main(["--split", "train", "--source", imnet["train_tar"], "--out", out,
                               *COMMON, "--jpeg-quality", "90"])


def test_imagenet_folder_matches_tar_and_val_labels(imnet, tmp_path):
    out = str(tmp_path / "folder")
    prepare_imagenet.main(["--split", "train", "--source", os.path.dirname(imnet["train_dir"]), "--out", out,
                           *COMMON, "--workers", "2"])
    assert {s["key"]: s["label"] for s in _samples(out)} == imnet["train"]
    for src in (imnet["val_tar"], imnet["val_dir"]):
        vout = str(tmp_path / ("val_" + os.path.basename(src)))
        m = prepare_imagenet.main(["--split", "val", "--source", src, "--devkit", imnet["devkit"], "--out", vout,
                                   *COMMON])
        assert {s["key"]: s["label"] for s in _samples(vout)} == imnet["val"]
        assert m["counts"]["skipped"] == 0
    with pytest.raises(UsageError, match="--devkit"):
        prepare_imagenet.main(["--split", "val", "--source", imnet["val_tar"], "--out", str(tmp_path / "x"),
                               *COMMON])


def test_wds_format_same_samples_and_deterministic(imnet, tmp_path):
    a, b, w = (str(tmp_path / n) for n in ("a", "b", "w"))
    ma = prepare_imagenet.main(["--split", "train", "--source", imnet["train_tar"], "--out", a, *COMMON])
    mb = prepare_imagenet.main(["--split", "train", "--source", imnet["train_tar"], "--out", b, *COMMON,
                                "--workers", "2"])
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    prepare_imagenet.main(["--split", "train", "--source", imnet["train_tar"], "--out", w, *COMMON,
                           "--format", "wds"])
    sa, sw = _samples(a), _samples(w)
    assert [(s["key"], s["label"], s["jpg"], s["orig_size"]) for s in sa] == \
        [(s["key"], s["label"], s["jpg"], s["orig_size"]) for s in sw]


def test_folder_cc_coco(tmp_path, imnet):
    out = str(tmp_path / "folder")
    m = prepare_folder.main(["--source", imnet["train_dir"], "--labels-from-subfolders", "--out", out, *COMMON])
    got = {s["key"]: s["label"] for s in _samples(out)}
    assert {k.split("/")[1]: v for k, v in got.items()} == imnet["train"]
    assert m["classes"] == SORTED_WNIDS

    cc = make_cc(str(tmp_path / "cc"))
    for args in (["--source", cc["dir"]], ["--tsv", cc["tsv"]]):
        o = str(tmp_path / f"cc_{args[0][2:]}")
        m = prepare_cc.main([*args, "--out", o, *COMMON])
        caps = [s["caption"] for s in _samples(o)]
        want = [c for c in cc["captions"].values() if c]
        assert caps == want and len(want) == len(cc["captions"]) - 1
        assert m["counts"]["skipped_by_reason"] == {"empty caption": 1}
        if args[0] == "--source":
            assert [s["key"] for s in _samples(o)] == [k for k, c in cc["captions"].items() if c]

    co = make_coco(str(tmp_path / "coco"))
    o = str(tmp_path / "coco_out")
    prepare_coco.main(["--captions", co["captions"], "--images", co["images"], "--out", o, "--num-pairs", "4",
                       *COMMON])
    samples = _samples(o)
    pairs = json.load(open(os.path.join(o, "pairs.json")))
    assert len(samples) == 4 and len({s["image_id"] for s in samples}) == 4
    assert [(s["image_id"], s["caption"]) for s in samples] == [(p["image_id"], p["caption"]) for p in pairs]
    assert all(s["caption"].startswith(f"image {s['image_id']} caption") for s in samples)
    assert prepare_coco.draw_pairs(co["captions"], 4, 0) == pairs  # fixed seed
    assert prepare_coco.draw_pairs(co["captions"], 4, 1) != pairs


def test_copy_with_extra_column(imnet, tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    prepare_imagenet.main(["--split", "val", "--source", imnet["val_tar"], "--devkit", imnet["devkit"],
                           "--out", src, *COMMON])

    def tokens(batch):
        return [np.full(4, s["index"], np.int16).tobytes() for s in batch]

    m = copy_with_extra_column(src, dst, tokens, "tokens", batch_size=4)
    assert m["columns"]["tokens"] == "bytes" and m["derived_from"]["added_column"] == "tokens"
    a, b = _samples(src), _samples(dst)
    assert [s["key"] for s in a] == [s["key"] for s in b]
    assert [np.frombuffer(s["tokens"], np.int16)[0] for s in b] == list(range(len(a)))


def test_cli_help_and_clear_errors(tmp_path):
    for mod in ("prepare_imagenet", "prepare_folder", "prepare_cc", "prepare_coco"):
        r = subprocess.run([sys.executable, "-m", f"data_pipeline.{mod}", "--help"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and "--out" in r.stdout and "--format" in r.stdout
    r = subprocess.run([sys.executable, "-m", "data_pipeline.prepare_folder", "--source", str(tmp_path / "none"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not a folder" in r.stderr
