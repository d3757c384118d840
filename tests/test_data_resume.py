"""Kill prepare_imagenet with SIGKILL partway (a real subprocess) and rerun: same shards as an uninterrupted run."""

import glob
import os
import subprocess
import sys
import time

from data_fixtures import make_imagenet
from helpers import kill_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(src, out, workers):
    return [sys.executable, "-m", "data_pipeline.prepare_imagenet", "--split", "train", "--source", src,
            "--out", out, "--shard-size", "3", "--workers", str(workers), "--size", "128", "--no-progress"]


def test_sigkill_then_rerun_gives_identical_output(tmp_path):
    info = make_imagenet(str(tmp_path / "in"), per_class=10, long_side=500)
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    subprocess.run(_cmd(info["train_tar"], ref, 1), check=True, env=env, timeout=120, capture_output=True)

    proc = subprocess.Popen(_cmd(info["train_tar"], out, 2), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while len(glob.glob(os.path.join(out, ".partial", "chunk.*.json"))) < 2 and time.time() < deadline:
            assert proc.poll() is None, "prepare finished before it could be killed"
            time.sleep(0.005)
        kill_tree(proc)  # SIGKILL the run and its worker processes
    finally:
        kill_tree(proc)
    assert not os.path.exists(os.path.join(out, "manifest.json")), "the kill came too late to test resume"
    n_done = len(glob.glob(os.path.join(out, ".partial", "chunk.*.json")))

    r = subprocess.run(_cmd(info["train_tar"], out, 2), env=env, timeout=120, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming: {n_done} shard(s) already done" in r.stdout + r.stderr
    ref_m = open(os.path.join(ref, "manifest.json")).read()
    out_m = open(os.path.join(out, "manifest.json")).read()
    assert out_m.replace(out, "X") == ref_m.replace(ref, "X")  # same shards, checksums, counts, skipped list
    for f in sorted(os.listdir(ref)):
        if f.startswith("shard."):
            assert open(os.path.join(ref, f), "rb").read() == open(os.path.join(out, f), "rb").read(), f
    assert sorted(os.listdir(ref)) == sorted(os.listdir(out))
