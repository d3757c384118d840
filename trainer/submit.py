"""Launch `trainer.train` through submitit, for users who launch from Python or without sbatch scripts.

    python -m trainer.submit --config configs/decoder_f16.yaml train.batch_size=256 \\
        --nodes 4 --gpus-per-node 8 --partition gpu --timeout-min 1440
    python -m trainer.submit --config configs/decoder_tiny.yaml --cluster local --tasks-per-node 2 --wait

Every submitit task is one trainer rank: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT come from
submitit's `JobEnvironment` and the trainer runs in the task's process (`runtime.launch` sees a torchrun-style
environment).

Preemption and time limits: Slurm sends submitit's signal (USR2, `--signal-delay-s` before the limit, or
`job._interrupt()` / `scancel --signal=USR2 JOBID`) to every task. `TrainJob` turns it into the trainer's own
preemption signal (USR1), so all ranks checkpoint together at the next step and leave with
`REQUEUE_EXIT_CODE`; only then does it hand over to submitit, which calls `TrainJob.checkpoint()` on rank 0
and requeues the job. The requeued job runs the same command and resumes from `<run_dir>/latest`. A plain
`scancel JOBID` (SIGTERM) reaches the trainer's own handler (it replaces submitit's bypass): the ranks save a
checkpoint at the next step and the job ends with `STOP_EXIT_CODE`, not requeued (submitit's convention).

A preemption as submitit signals it (`job._interrupt()`) is SIGTERM first, then USR2, two separate `scancel`
calls. When a step boundary falls between them, the ranks have already stopped and saved on the TERM alone; so
after a stop each task waits up to `FOLLOW_UP_WAIT_S` for the USR2, and if it comes, requeues from the checkpoint
it just saved instead of ending the job.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
from pathlib import Path

import submitit
from submitit.core.utils import DelayedSubmission

from runtime.signals import REQUEUE_EXIT_CODE, STOP_EXIT_CODE

TRAINER_SIGNAL = signal.SIGUSR1  # what runtime.signals listens to (besides SIGTERM)
FOLLOW_UP_WAIT_S = 20.0  # after a SIGTERM stop: how long to wait for a preemption's USR2 (under Slurm's KillWait)


def dist_env(job_env: submitit.JobEnvironment, job_id: str | None = None) -> dict[str, str]:
    """torch.distributed rendezvous variables of this submitit task. Rank 0 is the first task of the
    first node, so MASTER_ADDR is the first host of the job; the port is derived from the job id
    (stable across requeues, distinct between jobs that share a node)."""
    hosts = job_env.hostnames if job_env.num_nodes > 1 else ["127.0.0.1"]
    jid = "".join(c for c in (job_id or job_env.job_id) if c.isdigit()) or "0"
    return {
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(job_env.num_tasks // max(job_env.num_nodes, 1)),
        "MASTER_ADDR": os.environ.get("MASTER_ADDR") or hosts[0],
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(20000 + int(jid) % 20000),
    }


class TrainJob(submitit.helpers.Checkpointable):
    """One trainer rank: `module.main(argv)` in this process, with submitit's preemption signal turned
    into the trainer's checkpoint-then-requeue path."""

    def __init__(self, argv: list[str], module: str = "trainer.train") -> None:
        self.argv = list(argv)
        self.module = module

    def __call__(self) -> int:
        job_env = submitit.JobEnvironment()
        os.environ.update(dist_env(job_env))
        sig = job_env._usr_sig()  # the signal submitit was set up with (USR2 unless SUBMITIT_PREEMPT_SIGNAL)
        submitit_handler = signal.getsignal(sig)
        preempted: list[int] = []

        def on_preempt(signum: int, frame) -> None:
            preempted.append(signum)
            trainer_handler = signal.getsignal(TRAINER_SIGNAL)
            if callable(trainer_handler) and trainer_handler is not on_preempt:
                trainer_handler(TRAINER_SIGNAL, frame)  # the trainer checkpoints at the next step
            elif callable(submitit_handler):
                submitit_handler(signum, frame)  # not training yet: nothing to save, requeue now

        signal.signal(sig, on_preempt)
        print(f"[submit] rank {job_env.global_rank}/{job_env.num_tasks} on {job_env.hostname}: "
              f"python -m {self.module} {' '.join(self.argv)}", flush=True)
        try:
            code = importlib.import_module(self.module).main(self.argv)
        except SystemExit as e:
            code = e.code
        if code in (None, 0):
            return 0
        if code == STOP_EXIT_CODE:
            if not preempted:
                print(f"[submit] rank {job_env.global_rank}: trainer stopped on SIGTERM and saved; waiting up to "
                      f"{FOLLOW_UP_WAIT_S:.0f} s for a preemption signal", flush=True)
                deadline = time.monotonic() + FOLLOW_UP_WAIT_S
                while not preempted and time.monotonic() < deadline:
                    time.sleep(0.1)
            if preempted:
                code = REQUEUE_EXIT_CODE  # SIGTERM, then submitit's signal: a preemption; the checkpoint is saved
        if code != REQUEUE_EXIT_CODE:
            raise SystemExit(code)
        print(f"[submit] rank {job_env.global_rank}: trainer checkpointed for preemption "
              f"(signal {preempted or 'not seen here'}); requeueing", flush=True)
        if callable(submitit_handler):
            submitit_handler(sig, None)  # rank 0: self.checkpoint(), requeue, exit
        raise SystemExit(REQUEUE_EXIT_CODE)  # other ranks: leave no result; the requeued job reruns them

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        """Requeue the same command: the trainer has written its checkpoint and resumes from `latest`."""
        return DelayedSubmission(TrainJob(self.argv, self.module))


def build_executor(args: argparse.Namespace) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=args.folder, cluster=args.cluster)
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
    params: dict = dict(
        name=args.name, nodes=args.nodes, tasks_per_node=tasks, timeout_min=args.timeout_min,
        cpus_per_task=args.cpus_per_task,
    )
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if executor.cluster == "slurm":
        params["slurm_signal_delay_s"] = args.signal_delay_s
        if args.partition:
            params["slurm_partition"] = args.partition
        if args.mem_gb is not None:
            params["mem_gb"] = args.mem_gb
    elif args.nodes != 1:
        raise SystemExit(f"--cluster {executor.cluster} runs on this machine only: use --nodes 1")
    executor.update_parameters(**params)
    return executor


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description="Submit python -m trainer.train through submitit; unknown key=value arguments are "
                    "config overrides passed to the trainer.")
    p.add_argument("--config", required=True, help="YAML preset, e.g. configs/decoder_f16.yaml")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one rank per GPU")
    p.add_argument("--tasks-per-node", type=int, default=0, help="ranks per node (default: GPUs, or 1)")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--mem-gb", type=float, default=None)
    p.add_argument("--partition", default=None)
    p.add_argument("--timeout-min", type=int, default=24 * 60)
    p.add_argument("--signal-delay-s", type=int, default=120,
                   help="seconds before the time limit at which the job checkpoints and requeues")
    p.add_argument("--cluster", choices=["slurm", "local", "debug"], default=None,
                   help="default: slurm when sbatch is on PATH, else local")
    p.add_argument("--folder", default="runs/submitit/%j", help="submitit logs and pickles")
    p.add_argument("--name", default="divae")
    p.add_argument("--module", default="trainer.train", help=argparse.SUPPRESS)
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        p.error(f"unknown arguments {bad}: config overrides are key=value")
    if not Path(args.config).is_file():
        p.error(f"--config {args.config}: no such file")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    executor = build_executor(args)
    job = executor.submit(TrainJob(["--config", args.config, *overrides], module=args.module))
    print(f"submitted job {job.job_id} ({executor.cluster}); logs: {job.paths.stdout}", flush=True)
    if args.wait:
        print(f"job {job.job_id} finished: {job.results()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
