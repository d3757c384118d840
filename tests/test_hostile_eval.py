"""`python -m evaluation.recon_fid` against hostile and unlucky inputs (issue 17, items 16 and 17).

Item 16: a folder of images is preprocessed by the shards' own code (an EXIF-rotated JPEG and a transparent
PNG come out exactly as `prepare_folder` writes them into shards), and its bad files (a truncated JPEG, a text
file named .jpg) are skipped and listed instead of ending the evaluation.
Item 17: every misuse fails before any model loads, with one line naming the argument and exit 2; damage
found while running (a truncated shard) is one line and exit 1; --debug adds the traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import bad_inputs, encode, photos, variant

from data_pipeline.images import SkipImage
from data_pipeline.reader import ShardReader
from divae.utils.cli import UsageError
from evaluation.data import ImageFolderDataset
from evaluation.recon_fid import cli, main

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
BAD = {"0_text.jpg": "not an image", "0_truncated.jpg": "truncated image"}  # sorted first


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder of photos with an EXIF-rotated JPEG, a transparent PNG and two bad files; the same folder as
    shards (prepare_folder); a VQ-only DiVAE file (the CNN decoder reconstructs) and a full one."""
    from data_pipeline.prepare_folder import main as prepare_folder
    from divae.model import DiVAE
    from divae.vq import VQ_PRESETS

    root = tmp_path_factory.mktemp("hostile_eval")
    src = root / "photos"
    src.mkdir()
    ps = photos()
    for i in range(5):
        (src / f"p{i}.jpg").write_bytes(encode(variant(ps[i % len(ps)], i, long_side=96)))
    odd = bad_inputs()
    (src / "rotated.jpg").write_bytes(odd["ok_exif_rotated.JPEG"][0])  # EXIF orientation 6
    rgba = np.dstack([variant(ps[2], 3, long_side=80), np.zeros(variant(ps[2], 3, long_side=80).shape[:2], np.uint8)])
    rgba[..., 3][:, : rgba.shape[1] // 2] = 255  # left half opaque, right half fully transparent
    (src / "alpha.png").write_bytes(encode(rgba, "PNG"))
    (src / "0_truncated.jpg").write_bytes(odd["bad_truncated.JPEG"][0])
    (src / "0_text.jpg").write_bytes(odd["bad_text.JPEG"][0])
    prepare_folder(["--source", str(src), "--out", str(root / "shards"), "--size", str(SIZE), "--workers", "0",
                    "--no-progress"])
    torch.manual_seed(0)
    DiVAE(VQ_PRESETS["tiny"]).save_pretrained(root / "vq.safetensors")
    return root


def test_folder_images_are_the_shard_images_and_bad_files_raise_skip(inputs):
    folder = ImageFolderDataset(inputs / "photos", size=SIZE)
    shards = ShardReader(str(inputs / "shards"))
    by_key = {shards[i]["key"]: shards[i]["image"] for i in range(len(shards))}
    assert len(folder) == len(by_key) + len(BAD)
    checked = 0
    names = [f.name for f in folder.files]
    for i, rel in enumerate(names):
        if rel in BAD:
            with pytest.raises(SkipImage) as e:
                folder[i]
            assert e.value.reason == BAD[rel] and e.value.detail.startswith(rel)
            continue
        np.testing.assert_array_equal(folder[i], by_key[Path(rel).stem], err_msg=rel)  # bitwise: same code
        checked += 1
    assert checked == 7
    rot = folder[names.index("rotated.jpg")]
    alpha = folder[names.index("alpha.png")]
    assert rot.shape == (SIZE, SIZE, 3)
    assert alpha[:, -8:].min() >= 250  # the transparent half is composited on white, not dropped to its RGB (black)


def test_recon_fid_on_a_folder_skips_and_lists_bad_files(inputs, tmp_path):
    out = tmp_path / "eval"
    # the first 5 files: the two bad ones (one whole batch of 2), then alpha.png, p0.jpg, p1.jpg
    res = main(["--checkpoint", str(inputs / "vq.safetensors"), "--data", str(inputs / "photos"), "--out", str(out),
                "--decoder", "cnn", "--batch-size", "2", "--num-images", "5", "--image-size", str(SIZE), "--no-ssim",
                "--no-lpips", "--ref-stats-dir", "", "--num-show", "2"])
    (r,) = res
    assert r["num_images"] == 3 and r["protocol"]["num_images"] == 5 and r["fid"] > 0
    listed = {s["detail"].split(" ")[0]: s["reason"] for s in r["skipped"]}
    assert listed == BAD
    saved = json.loads((out / "results.json").read_text())
    assert [s["index"] for s in saved["skipped"]] == [s["index"] for s in r["skipped"]]
    assert "Skipped 2 input(s)" in (out / "results.md").read_text()


def _args(inputs: Path, tmp_path: Path, **over: str) -> list[str]:
    a = {"--checkpoint": str(inputs / "vq.safetensors"), "--data": str(inputs / "shards"), "--out": str(tmp_path / "o"),
         "--decoder": "cnn", "--ref-stats-dir": "", "--no-ssim": None, "--no-lpips": None, **over}
    return [x for k, v in a.items() for x in ([k] if v is None else [k, v])]


def test_misuse_is_one_line_and_exit_2_before_any_model_loads(inputs, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    shutil.copy(inputs / "vq.safetensors", tmp_path / "copy.safetensors")
    cases = {
        "--checkpoint": ({"--checkpoint": str(tmp_path / "missing.safetensors")}, "no such file"),
        "--data": ({"--data": str(tmp_path / "missing")}, "no such folder"),
        "--inception-weights": ({"--inception-weights": str(tmp_path / "none.pth")}, "not found"),
        "--out": ({"--out": str(tmp_path / "a_file")}, "is a file; give a folder"),
        "--num-images": ({"--num-images": "100"}, "holds 7 images; pass at most 7"),
        "--decoder": ({"--decoder": "diffusion"}, "holds no diffusion decoder"),
    }
    for flag, (over, expected) in cases.items():
        code = cli(_args(inputs, tmp_path, **over))
        err = capsys.readouterr().err.strip()
        assert code == 2, (flag, err)
        assert err.count("\n") == 0 and flag in err and expected in err and "Traceback" not in err, (flag, err)
    # argparse-level misuse (exit 2 from argparse itself, before main does anything)
    for flag, value, expected in (("--batch-size", "0", "must be >= 1, got 0"),
                                  ("--sampler", "euler", "invalid choice: 'euler'")):
        with pytest.raises(SystemExit) as e:
            cli(_args(inputs, tmp_path, **{flag: value}))
        assert e.value.code == 2 and expected in capsys.readouterr().err
    with pytest.raises(UsageError, match="no such file"):  # main() itself raises, for callers in Python
        main(_args(inputs, tmp_path, **{"--checkpoint": str(tmp_path / "missing.safetensors")}))


def test_cli_process_exit_codes_and_debug(inputs, tmp_path):
    bad = tmp_path / "bad_shards"
    shutil.copytree(inputs / "shards", bad)
    shard = next(p for p in sorted(bad.iterdir()) if p.name.startswith("shard."))
    os.truncate(shard, shard.stat().st_size - 100)

    def run(*extra: str, **over: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "evaluation.recon_fid", *_args(inputs, tmp_path, **over), *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    r = run(**{"--data": str(bad)})
    assert r.returncode == 1, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(shard) in lines[0] and "truncated" in lines[0], r.stderr[-2000:]
    r = run("--debug", **{"--data": str(bad)})
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr and str(shard) in r.stderr
    r = run(**{"--checkpoint": str(tmp_path / "missing.safetensors")})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--checkpoint" in r.stderr, r.stderr
