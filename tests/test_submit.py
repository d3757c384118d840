"""trainer.submit: submitit launch. Rank variables from submitit's JobEnvironment and CLI checks; its run on the local
Slurm cluster (a preempted job that requeues through `TrainJob.checkpoint()`) is in tests/test_slurm.py, with every
other test that needs the cluster."""

from __future__ import annotations

import os

import pytest
import submitit
from slurm_cluster import ROOT

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
