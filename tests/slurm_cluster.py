"""Helpers for tests that use the local Slurm cluster started by `bash .ci/slurm.sh up`.

Outside CI (env CI unset) a missing cluster skips those tests with the command that starts it; in CI
(CI=true) a missing cluster is a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def cluster_problem() -> str | None:
    """None when sbatch works and at least two nodes are idle, else why not."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "Slurm is not installed"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%D %T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed: {e}"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()}"
    idle = sum(int(line.split()[0]) for line in out.stdout.splitlines() if line.split()[1:] == ["idle"])
    return None if idle >= 2 else f"fewer than 2 idle Slurm nodes (sinfo: {out.stdout.strip()!r})"


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    problem = cluster_problem()
    if problem is None:
        return
    message = f"no local Slurm cluster ({problem}); start one with `bash .ci/slurm.sh up`"
    if in_ci():
        pytest.fail(message + " -- .ci/run must start it before the tests")
    # Outside CI only (a developer box without the cluster): CI starts the cluster and fails above, so this
    # skip can never hide a failure of the Slurm tests in a landed run.
    pytest.skip(message)


def job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         check=True).stdout
    fields = {}
    for tok in out.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            fields.setdefault(k, v)
    return fields


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.5, on_timeout=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    detail = on_timeout() if on_timeout else ""
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{detail}")


def logged_steps(run_dir: Path) -> list[int]:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line)["step"] for line in f.read_text().splitlines() if line.strip()]


def start_requeued_now(job_id: str) -> None:
    """A requeued job waits for a begin time (and the old credential to expire); once it is pending again,
    let it start now. Starting within the same second as the requeue gets 'Job credential revoked', so
    wait 2 s first."""
    wait_until(lambda: job_fields(job_id).get("JobState") in ("PENDING", "RUNNING", "COMPLETED"), 60,
               f"job {job_id} to be requeued")
    time.sleep(2)
    if job_fields(job_id).get("JobState") == "PENDING":
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)


def make_decoder_inputs(root: Path, fmt: str = "wds", variants: int = 2) -> dict[str, str]:
    """Tiny real-photo shards (64 px, `variants` crops of each photo) and a VQ weights file (random weights,
    vq_tiny architecture): what `configs/decoder_tiny.yaml` needs. Returns the config overrides that point at them.
    webdataset by default: mosaicml-streaming keys its shared memory by node, and the two Slurm "nodes" here
    share one /dev/shm, so MDS shards work only for jobs on one node."""
    import sys

    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parent))
    from data_fixtures import photos

    from data_pipeline.prepare_folder import main as prepare_folder
    from divae.model import DiVAE
    from trainer.config import load_train_config

    img = root / "img"
    img.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(photos()):
        for j in range(variants):
            Image.fromarray(a[j // 2 * 8:, :: j % 2 + 1]).save(img / f"p{i}_{j}.png")
    prepare_folder(["--source", str(img), "--out", str(root / "shards"), "--size", "64", "--workers", "1",
                    "--format", fmt, "--shard-size", "2", "--no-progress"])
    DiVAE(load_train_config(ROOT / "configs/vq_tiny.yaml").vq).save_pretrained(root / "vq.safetensors")
    return {"data.path": str(root / "shards"), "data.format": fmt,
            "decoder.vq_weights": str(root / "vq.safetensors")}
