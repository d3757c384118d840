"""The Slurm scripts (slurm/) on a real local Slurm cluster (.ci/slurm.sh): a 2-node CPU decoder run that is
preempted with USR1, checkpoints, requeues itself and resumes from the saved step. Plus fast checks of the
scripts that need no cluster."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from slurm_cluster import (  # noqa: F401  (slurm_cluster is a fixture)
    ROOT,
    job_fields,
    logged_steps,
    make_decoder_inputs,
    slurm_cluster,
    start_requeued_now,
    wait_until,
)

from trainer.preemption import REQUEUE_EXIT_CODE, REQUEUE_MARKER

SCRIPTS = ["train_vq.sh", "train_decoder.sh", "train_prior.sh"]


def test_common_matches_trainer_preemption_contract():
    common = (ROOT / "slurm/_common.sh").read_text()
    assert f"DIVAE_REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}\n" in common
    assert f"DIVAE_REQUEUE_MARKER={REQUEUE_MARKER}\n" in common


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_defaults_and_syntax(name):
    path = ROOT / "slurm" / name
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert os.access(path, os.X_OK), f"{path} is not executable"
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", path.read_text(), re.M))
    assert "requeue" in sbatch
    assert sbatch["signal"] == "B:USR1@120"
    assert sbatch["open-mode"] == "append"
    assert int(sbatch["nodes"]) >= 2 and int(sbatch["gpus-per-node"]) >= 1
    assert sbatch["ntasks-per-node"] == "1"  # one torchrun per node


def test_script_outside_slurm_fails_clearly(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", str(ROOT / "slurm/train_decoder.sh"), "configs/decoder_tiny.yaml"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 2
    assert "not inside a Slurm job" in r.stderr


@pytest.fixture(scope="module")
def decoder_inputs(tmp_path_factory) -> dict[str, str]:
    return make_decoder_inputs(tmp_path_factory.mktemp("slurm_inputs"))


@pytest.mark.slow
@pytest.mark.slurm
def test_sbatch_two_nodes_preempt_requeue_resume(slurm_cluster, decoder_inputs, tmp_path):  # noqa: F811
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    steps = 16
    overrides = [f"{k}={v}" for k, v in decoder_inputs.items()] + [
        f"train.run_dir={run_dir}", f"train.steps={steps}", "train.batch_size=2", "checkpoint.every=0",
        "logging.every=1", "logging.sample_every=0", "logging.wandb_mode=disabled",
    ]
    env = dict(os.environ, NPROC_PER_NODE="1", OMP_NUM_THREADS="1")
    job = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=0", "--time=10",
         f"--output={out}", "slurm/train_decoder.sh", "configs/decoder_tiny.yaml", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    log = lambda: out.read_text() if out.exists() else ""  # noqa: E731
    try:
        # let it train a few steps, then preempt: USR1 to the batch shell and to every process of the step
        def training() -> bool:
            state = job_fields(job)["JobState"]
            assert state in ("PENDING", "RUNNING"), f"job {job} is {state} before the preemption\n{log()}"
            return len(logged_steps(run_dir)) >= 3

        wait_until(training, 150, "3 logged training steps", on_timeout=log)
        subprocess.run(["scancel", "--signal=USR1", "--full", job], check=True)
        wait_until(lambda: int(job_fields(job).get("Restarts", 0)) >= 1, 120, "the job to requeue itself",
                   on_timeout=log)
        start_requeued_now(job)
        wait_until(lambda: job_fields(job)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
                   180, "the requeued job to finish", on_timeout=log)
    finally:
        subprocess.run(["scancel", job], check=False)
    text = log()
    fields = job_fields(job)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", f"{fields}\n{text}"
    assert fields["Restarts"] == "1", text

    # the first run stopped at a checkpoint for preemption and the shell requeued on the trainer's marker
    m = re.search(rf"requeueing job {job}: the trainer left \S+/{REQUEUE_MARKER} \(step (\d+)\)", text)
    assert m, text
    saved = int(m.group(1))
    assert 3 <= saved < steps
    assert "restart 0: 2 node(s) x 1 rank(s)" in text and "restart 1: 2 node(s) x 1 rank(s)" in text
    assert "batch shell got SIGUSR1" in text
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert f"step_{saved:08d}" in ckpts and f"step_{steps:08d}" in ckpts, ckpts
    assert (run_dir / "checkpoints/latest").read_text().strip().endswith(f"step_{steps:08d}")
    assert not (run_dir / REQUEUE_MARKER).exists()

    # the requeued run resumed from the saved step, not from 0: every step logged exactly once, in order
    logged = logged_steps(run_dir)
    assert logged == list(range(1, steps + 1)), logged
    first_run, second_run = text.split("restart 1:")
    assert f"checkpoint at step {saved} saved, exiting with {REQUEUE_EXIT_CODE}" in first_run
    assert re.search(rf"resumed from \S+step_{saved:08d} \(step {saved}\)", second_run), second_run
