"""trainer.submit: submitit launch. Rank variables from submitit's JobEnvironment, CLI checks, and on the local
Slurm cluster a 2-rank decoder job that is preempted (SIGTERM, then submitit's USR2), checkpoints, requeues through
`TrainJob.checkpoint()` and resumes from the saved step."""

from __future__ import annotations

import os
import subprocess

import pytest
import submitit
from slurm_cluster import (  # noqa: F401  (slurm_cluster is a fixture)
    ROOT,
    job_fields,
    logged_steps,
    make_decoder_inputs,
    slurm_cluster,
    start_requeued_now,
    wait_until,
)
from submitit.slurm.slurm import SlurmJobEnvironment

from trainer.submit import TrainJob, build_executor, dist_env, parse_args


def test_dist_env_from_slurm_job_environment(monkeypatch):
    for k in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(k)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    env = dist_env(submitit.JobEnvironment())
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 1234)}


def test_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):
        parse_args(["--config", str(ROOT / "configs/decoder_tiny.yaml"), "not_an_override"])
    args, overrides = parse_args(["--config", str(ROOT / "configs/decoder_tiny.yaml"), "train.steps=3",
                                  "--nodes", "2", "--gpus-per-node", "8", "--cluster", "debug"])
    assert overrides == ["train.steps=3"] and args.nodes == 2 and args.gpus_per_node == 8
    with pytest.raises(SystemExit, match="--nodes 1"):
        build_executor(args)  # the debug/local executors run on this machine only


def test_checkpoint_resubmits_the_same_command():
    job = TrainJob(["--config", "c.yaml", "train.steps=3"])
    delayed = job.checkpoint()
    assert isinstance(delayed.function, TrainJob) and delayed.function.argv == job.argv


@pytest.fixture(scope="module")
def decoder_inputs(tmp_path_factory) -> dict[str, str]:
    return make_decoder_inputs(tmp_path_factory.mktemp("submit_inputs"))


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.serial
@pytest.mark.parametrize("arrival", ["interrupt", "usr2_after_the_stop"])
def test_submitit_preempt_checkpoint_requeue_resume(slurm_cluster, decoder_inputs, tmp_path, monkeypatch,  # noqa: F811
                                                    arrival):
    """A preemption as submitit signals it: SIGTERM, then USR2. `interrupt` sends both back to back
    (`job._interrupt()`), so a step boundary may or may not fall between them; `usr2_after_the_stop` makes that
    race certain: the USR2 comes only after the ranks stopped and saved on the TERM alone. Either way the job
    requeues once and resumes after the saved step."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(ROOT)
    run_dir, steps = tmp_path / "run", 16
    overrides = [f"{k}={v}" for k, v in decoder_inputs.items()] + [
        f"train.run_dir={run_dir}", f"train.steps={steps}", "train.batch_size=2", "checkpoint.every=0",
        "logging.every=1", "logging.sample_every=0", "logging.wandb_mode=disabled"]
    args, overrides = parse_args(["--config", "configs/decoder_tiny.yaml", *overrides, "--cluster", "slurm",
                                  "--tasks-per-node", "2", "--cpus-per-task", "1", "--timeout-min", "30",
                                  "--folder", str(tmp_path / "submitit")])
    executor = build_executor(args)
    job = executor.submit(TrainJob(["--config", args.config, *overrides]))
    log = lambda: job.paths.stdout.read_text() if job.paths.stdout.exists() else ""  # noqa: E731

    def detail() -> str:
        err = job.paths.stderr.read_text() if job.paths.stderr.exists() else ""
        return (f"job {job_fields(job.job_id)}\nlogged steps {logged_steps(run_dir)}\nstdout:\n{log()}\n"
                f"stderr (tail):\n{err[-3000:]}")

    try:
        def training() -> bool:
            state = job_fields(job.job_id)["JobState"]
            assert state in ("PENDING", "RUNNING"), f"job {job.job_id} is {state} before the preemption\n{log()}"
            return len(logged_steps(run_dir)) >= 3

        wait_until(training, 150, "3 logged training steps", on_timeout=detail)
        if arrival == "interrupt":
            job._interrupt()  # what submitit sends for a preemption: SIGTERM, then its USR2, to every task
        else:
            subprocess.run(["scancel", "--signal=TERM", job.job_id], check=True)
            wait_until(lambda: "trainer stopped on SIGTERM and saved" in log(), 120, "the ranks to stop and save",
                       on_timeout=detail)
            subprocess.run(["scancel", f"--signal={SlurmJobEnvironment.USR_SIG}", job.job_id], check=True)
        wait_until(lambda: int(job_fields(job.job_id).get("Restarts", 0)) >= 1, 120, "the job to requeue",
                   on_timeout=detail)
        start_requeued_now(job.job_id)
        wait_until(lambda: job_fields(job.job_id)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), 180,
                   "the requeued job to finish", on_timeout=detail)
        assert job.results() == [0, 0]  # both ranks of the requeued run finished
    finally:
        job.cancel(check=False)
    assert job_fields(job.job_id)["Restarts"] == "1"
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    saved = [int(n[5:]) for n in ckpts if int(n[5:]) < steps]
    assert saved and 3 <= saved[0] < steps, ckpts  # the preemption checkpoint
    assert logged_steps(run_dir) == list(range(1, steps + 1))  # resumed after it, never from step 0
    text = log() + job.paths.stderr.read_text()
    assert "rank 0: trainer checkpointed for preemption" in text and f"Requeued job {job.job_id}" in text, text
