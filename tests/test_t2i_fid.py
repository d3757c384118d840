"""`python -m evaluation.t2i_fid` end to end on a COCO-shaped fixture: the draw is recorded and stable, one rank
in-process, two ranks under torchrun and another batch size give the same FID, and a run SIGKILLed after a
partial save then rerun gives the same FID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import torchrun
from PIL import Image
from t2i_fixtures import make_coco, make_models, scene

from divae.utils.cli import UsageError
from evaluation.t2i_fid import draw_indices, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    coco = make_coco(root, n=8)
    prior, divae = make_models(root, [c for i in range(8) for c in scene(i)[1]])
    return root, coco, prior, divae


def args(inputs, out: Path, batch_size: int, *extra: str) -> list[str]:
    root, coco, prior, divae = inputs
    return ["--prior", str(prior), "--divae", str(divae), "--data", str(coco), "--out", str(out), "--num-captions",
            "6", "--draw-seed", "3", "--steps", "2", "--batch-size", str(batch_size), "--ref-stats-dir",
            str(root / "ref"), "--num-show", "3", "--top-k", "64", *extra]


def _run(cmd: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_draw_is_stable():
    a = draw_indices(100, 30, seed=0)
    assert a == draw_indices(100, 30, seed=0) and a == sorted(set(a)) and len(a) == 30
    assert a != draw_indices(100, 30, seed=1)
    assert draw_indices(5, 30, seed=0) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_ranks_batch_size_and_kill_give_the_same_fid(inputs, tmp_path):
    one = main(args(inputs, tmp_path / "one", 4))
    assert one["num_images"] == 6 and one["fid"] > 0 and one["psnr"] is None and one["ssim"] is None
    assert one["reference_stats"].startswith("computed")
    saved = json.loads((tmp_path / "one" / "results.json").read_text())
    assert saved["fid"] == one["fid"] and saved["draw"]["indices"] == draw_indices(8, 6, seed=3)
    assert saved["protocol"]["guidance_scale"] == 3.0 and saved["protocol"]["top_k"] == 64
    caps = json.loads((tmp_path / "one" / "captions.json").read_text())
    assert [c["pair_index"] for c in caps] == saved["draw"]["indices"]
    assert "| DiVAE DDPM2 CFG3 |" in (tmp_path / "one" / "results.md").read_text()
    assert Image.open(tmp_path / "one" / "samples.png").size[1] == 3 * 66 + 2  # 3 captions, one row each

    # another batch size in-process: per-caption seeds, the cached reference statistics
    other = main(args(inputs, tmp_path / "bs3", 3, "--save-images", str(tmp_path / "images")))
    assert other["reference_stats"].startswith("cached")
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{j:05d}.png" for j in range(6)]
    assert Image.open(tmp_path / "images" / "00005.png").size == (64, 64)
    assert other["draw"] == saved["draw"]
    assert other["fid"] == pytest.approx(one["fid"], rel=1e-4)

    # two ranks under torchrun
    two = _run(torchrun(2, "-m", "evaluation.t2i_fid", *args(inputs, tmp_path / "two", 2)))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert r2["protocol"]["world_size"] == 2 and r2["draw"] == saved["draw"]
    assert r2["fid"] == pytest.approx(one["fid"], rel=1e-4)

    # SIGKILL after the first partial save, then rerun: the same figure
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "evaluation.t2i_fid", *args(inputs, out, 1, "--save-every", "1")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    progress = out / "partial" / "rank00000-of-00001.json"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if progress.is_file() and json.loads(progress.read_text())["pos"] >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()
    rerun = _run([sys.executable, "-m", "evaluation.t2i_fid", *args(inputs, out, 1, "--save-every", "1")])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    r3 = json.loads((out / "results.json").read_text())
    assert r3["resumed"] and r3["images_this_session"] < 6
    assert r3["fid"] == pytest.approx(one["fid"], rel=1e-4)


def test_mismatched_models_fail_clearly(inputs, tmp_path):
    root, coco, prior, divae = inputs
    with pytest.raises(UsageError, match="--prior .* is not a prior checkpoint"):
        main(args((root, coco, divae, divae), tmp_path / "x", 2))
    with pytest.raises(UsageError, match="no such file"):
        main(args((root, coco, prior, tmp_path / "missing.safetensors"), tmp_path / "x", 2))
    with pytest.raises(UsageError, match="open_clip"):
        main(args(inputs, tmp_path / "x", 2, "--clip-weights", str(prior)))
    # more captions than the folder's pairs: refused in one line with the count, not a silent smaller FID
    with pytest.raises(UsageError, match=r"^--num-captions 1,000,000 but --data .* holds \d+ pairs .*: pass "):
        main(args(inputs, tmp_path / "x", 2, "--num-captions", "1000000"))


def test_default_caption_count_takes_every_pair_loudly_below_30k(caplog):
    import argparse

    from evaluation.t2i_fid import DEFAULT_CAPTIONS, _captions_to_draw

    assert _captions_to_draw(argparse.Namespace(num_captions=None, data="d"), 10**6) == DEFAULT_CAPTIONS == 30_000
    assert not caplog.records
    assert _captions_to_draw(argparse.Namespace(num_captions=None, data="d"), 40) == 40
    assert "holds 40 pairs, fewer than the 30000 captions" in caplog.text and "not comparable" in caplog.text
    assert _captions_to_draw(argparse.Namespace(num_captions=12, data="d"), 40) == 12


def test_slurm_script_syntax_and_usage(tmp_path):
    import re

    path = ROOT / "slurm" / "t2i_fid.sh"
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert os.access(path, os.X_OK)
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", path.read_text(), re.M))
    assert "requeue" in sbatch and sbatch["signal"] == "B:USR1@120"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", str(path), "--prior", "p"], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 2 and "not inside a Slurm job" in r.stderr
    r = subprocess.run(["bash", str(path), "--prior", "p"], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                       env={**env, "SLURM_JOB_ID": "1", "DIVAE_ROOT": str(ROOT)})
    assert r.returncode == 2 and "--prior PRIOR --divae DIVAE --data COCO_PAIRS" in r.stderr
