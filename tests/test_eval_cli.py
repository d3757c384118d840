"""`python -m evaluation.recon_fid` end to end: a tiny DiVAE file, real MDS val shards, both decoders,
one rank in-process and two ranks under torchrun give the same figures."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from eval_fixtures import N_IMAGES, inputs  # noqa: F401 - the tiny DiVAE file and MDS val shards
from helpers import kill_tree, torchrun
from PIL import Image

from evaluation.recon_fid import main

ROOT = Path(__file__).resolve().parents[1]
N = N_IMAGES  # the photos in `inputs`


def cli_args(root: Path, out: Path, batch_size: int) -> list[str]:
    return ["--checkpoint", str(root / "divae.safetensors"), "--data", str(root / "val"), "--out", str(out),
            "--decoder", "both", "--sampler", "ddpm", "--steps", "3", "--batch-size", str(batch_size),
            "--ref-stats-dir", str(out / "ref"), "--num-show", "4", "--no-lpips"]


@pytest.mark.slow
def test_one_rank_and_two_ranks_agree(inputs, tmp_path):  # noqa: F811
    one = main(cli_args(inputs, tmp_path / "one", batch_size=4))
    assert [r["protocol"]["decoder"] for r in one] == ["cnn", "diffusion"]
    cnn, diff = one
    assert cnn["num_images"] == diff["num_images"] == N
    assert cnn["reference_stats"].startswith("computed") and diff["reference_stats"].startswith("cached")
    assert cnn["codebook"]["codebook_size"] == 256 and cnn["codebook"] == diff["codebook"]
    assert diff["protocol"]["sampler"] == "ddpm" and diff["protocol"]["steps"] == 3
    assert cnn["fid"] > 0 and diff["fid"] > 0 and cnn["fid"] != diff["fid"]
    md = (tmp_path / "one" / "results.md").read_text()
    assert "| VQGAN (CNN decoder) |" in md and "| DiVAE DDPM3 |" in md and "8x8 → 64x64 | f8 | 256 | ddpm | 3 |" in md
    assert Image.open(tmp_path / "one" / "samples.png").size[1] == 3 * 66 + 2  # originals, cnn, diffusion
    assert json.loads((tmp_path / "one" / "diffusion" / "results.json").read_text())["fid"] == diff["fid"]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = torchrun(2, "-m", "evaluation.recon_fid", *cli_args(inputs, tmp_path / "two", batch_size=2))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:  # timed out: SIGKILL torchrun and its ranks (they run in their own sessions)
            kill_tree(proc)
    assert proc.returncode == 0, log.decode()[-4000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    for a, b in zip(one, two):
        assert b["num_images"] == N and b["protocol"]["world_size"] == 2
        # per-image seeds: only float32 rounding of batched kernels differs between 1 and 2 ranks
        assert b["fid"] == pytest.approx(a["fid"], rel=1e-3, abs=1e-3)
        assert b["psnr"] == pytest.approx(a["psnr"], rel=1e-3)
        assert b["codebook"] == a["codebook"]


def test_bad_checkpoint_fails_clearly(inputs, tmp_path):  # noqa: F811
    from divae.utils.cli import UsageError

    with pytest.raises(UsageError, match="--checkpoint .*missing.safetensors: no such file"):
        main(["--checkpoint", str(tmp_path / "missing.safetensors"), "--data", str(inputs / "val")])
