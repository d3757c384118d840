"""Real trainer runs for the tests: launch `python -m trainer.train` (one process) or `torchrun` (N ranks) in its
own session, wait with a timeout that kills the whole process tree, read `metrics.jsonl`, find the ranks' pids
(the generic process and port helpers are in tests/helpers.py). Shared by the trainer, elastic, distillation,
prior and pre-encode tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import descendants, free_port, kill_tree, torchrun

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# -- processes (the generic helpers are in tests/helpers.py) -------------------------------------------------
def _rank_pids(proc: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the trainer processes under a torchrun (or the process itself for one rank)."""
    out = {}
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"trainer.train" not in cmd or b"torchrun" in cmd:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = pid
    return out


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", **extra)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def start(args: list[str], nproc: int, log: Path, **env: str) -> subprocess.Popen:
    if nproc == 1:
        cmd = [PY, "-m", "trainer.train", *args]
    else:
        cmd = torchrun(nproc, "-m", "trainer.train", *args, port=free_port())
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"run timed out after {timeout} s; log tail:\n{log.read_text()[-4000:]}")


def run(args: list[str], nproc: int, log: Path, timeout: float = 240, **env: str) -> int:
    return wait(start(args, nproc, log, **env), log, timeout)


def metrics(run_dir: Path) -> dict[int, dict]:
    """step -> the last logged metrics line of that step (a resumed run re-logs steps after its checkpoint)."""
    rows = {}
    f = run_dir / "metrics.jsonl"
    if f.exists():
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[r["step"]] = r
    return rows


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, log: Path, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if max(metrics(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended (code {proc.returncode}) before step {step}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    kill_tree(proc)
    pytest.fail(f"no step {step} within {timeout} s:\n{log.read_text()[-4000:]}")


def common(data: Path, run_dir: Path) -> list[str]:
    return [f"data.path={data}", f"train.run_dir={run_dir}", "logging.every=1", "logging.progress=false",
            "logging.wandb_mode=disabled"]
