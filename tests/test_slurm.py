"""The Slurm scripts (slurm/) on a real local Slurm cluster (.ci/slurm.sh): a 2-node CPU decoder run that is
preempted with USR1, checkpoints, requeues itself and resumes from the saved step; and trainer.submit's submitit job,
preempted the way submitit signals it. Plus fast checks of the scripts that need no cluster.

Every test that submits to the cluster lives in this module: `make test` gives a module to one xdist worker, so the
cluster's jobs run one after another (two at once would wait for each other's nodes)."""

from __future__ import annotations

import json
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
from submitit.slurm.slurm import SlurmJobEnvironment

from runtime.signals import REQUEUE_EXIT_CODE, REQUEUE_MARKER
from trainer.submit import TrainJob, build_executor, parse_args

# The stage names under which slurm/train.sh is submitted (links to it) and the default config each picks.
STAGE_DEFAULTS = {"train_vq.sh": "configs/vq_f16.yaml", "train_decoder.sh": "configs/decoder_f16.yaml",
                  "train_prior.sh": "configs/prior_base.yaml"}
SCRIPTS = ["train.sh", *STAGE_DEFAULTS]


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


def _no_slurm_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def test_stage_scripts_are_links_to_train_sh_and_pick_their_default_config():
    """One training script: train_{vq,decoder,prior}.sh are git symlinks to train.sh, and the name it runs under
    chooses the config used when none is given (the check before the Slurm one prints it); train.sh has none."""
    for name, config in STAGE_DEFAULTS.items():
        path = ROOT / "slurm" / name
        assert path.is_symlink() and os.readlink(path) == "train.sh", f"{path} is not a link to train.sh"
        mode = subprocess.run(["git", "ls-files", "-s", f"slurm/{name}"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.split()[:1]
        assert mode in ([], ["120000"]), f"git does not record slurm/{name} as a symlink: {mode}"
        assert (ROOT / config).is_file(), config
        r = subprocess.run(["bash", f"slurm/{name}"], capture_output=True, text=True, env=_no_slurm_env(), cwd=ROOT,
                           timeout=60)
        assert r.returncode == 2 and f"not inside a Slurm job (config {config})" in r.stderr, r.stderr
    r = subprocess.run(["bash", "slurm/train.sh"], capture_output=True, text=True, env=_no_slurm_env(), cwd=ROOT,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr == "[divae] error: usage: sbatch slurm/train.sh configs/<preset>.yaml [key=value ...]\n"


def test_default_config_under_sbatch_comes_from_the_submitted_name(tmp_path):
    """sbatch runs a spool copy named slurm_script: the stage comes from the path `scontrol show job` gives."""
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho '   Command=/home/u/divae/slurm/train_prior.sh x=1'\n")
    (tmp_path / "scontrol").chmod(0o755)
    env = dict(_no_slurm_env(), SLURM_JOB_ID="7", PATH=f"{tmp_path}:{os.environ['PATH']}")
    code = f'source {ROOT / "slurm/_common.sh"}; divae_default_config "$(divae_submitted_script)"'
    r = subprocess.run(["bash", "-c", code, "/var/spool/slurmd/job00007/slurm_script"], capture_output=True,
                       text=True, env=env, check=True, timeout=60)
    assert r.stdout == "configs/prior_base.yaml\n", r


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


def _sbatch(overrides: list[str], out, *flags: str, env: dict[str, str] | None = None) -> str:
    """Submit the decoder script on 2 nodes x 1 CPU rank; returns the job id."""
    env = dict(os.environ, NPROC_PER_NODE="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=0", *flags,
         f"--output={out}", "slurm/train_decoder.sh", "configs/decoder_tiny.yaml", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]


def _overrides(decoder_inputs: dict[str, str], run_dir, *extra: str) -> list[str]:
    return [f"{k}={v}" for k, v in decoder_inputs.items()] + [
        f"train.run_dir={run_dir}", "train.steps=100000", "train.batch_size=2", "logging.every=1",
        "logging.sample_every=0", "logging.wandb_mode=disabled", *extra]


_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.mark.slow
@pytest.mark.slurm
def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm_cluster, decoder_inputs, tmp_path):  # noqa: F811
    """A real time limit and no scancel: `--time=1 --signal=B:USR1@40`. Slurm's time limits count in minutes, so
    one minute is the shortest job; it sends USR1 ~20 s into each run (seen: +18 s), long before the limit. The
    first run checkpoints at the next step and requeues itself; the requeued run resumes from that step and, at
    its own USR1, checkpoints again; DIVAE_MAX_REQUEUES=1 ends the job there. Takes about 1-2 minutes."""
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = _sbatch(_overrides(decoder_inputs, run_dir, "checkpoint.every=0"), out, "--time=1",
                  "--signal=B:USR1@40", env={"DIVAE_MAX_REQUEUES": "1"})
    log = lambda: out.read_text() if out.exists() else ""  # noqa: E731
    try:
        wait_until(lambda: int(job_fields(job).get("Restarts", 0)) >= 1, 150, "the job to requeue itself",
                   on_timeout=log)
        start_requeued_now(job)
        wait_until(lambda: job_fields(job)["JobState"] in _ENDED, 150, "the requeued run to end", on_timeout=log)
    finally:
        subprocess.run(["scancel", job], check=False)
    text = log()
    fields = job_fields(job)
    assert fields["Restarts"] == "1" and fields["JobState"] != "TIMEOUT", f"{fields}\n{text}"
    first_run, second_run = text.split("restart 1:")
    assert "batch shell got SIGUSR1" in first_run and "batch shell got SIGTERM" not in first_run, first_run
    m = re.search(rf"requeueing job {job}: the trainer left \S+/{REQUEUE_MARKER} \(step (\d+)\)", first_run)
    assert m, first_run
    saved = int(m.group(1))
    assert f"checkpoint at step {saved} saved, exiting with {REQUEUE_EXIT_CODE}" in first_run
    assert re.search(rf"resumed from \S+step_{saved:08d} \(step {saved}\)", second_run), second_run
    m2 = re.search(rf"checkpoint at step (\d+) saved, exiting with {REQUEUE_EXIT_CODE}", second_run)
    assert m2 and int(m2.group(1)) > saved, second_run
    assert "not requeueing: already restarted 1 times" in second_run, second_run
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{saved:08d}", f"step_{int(m2.group(1)):08d}"], ckpts
    assert logged_steps(run_dir) == list(range(1, int(m2.group(1)) + 1))  # resumed, not restarted from 0


@pytest.mark.slow
@pytest.mark.slurm
def test_usr1_before_the_ranks_are_up_is_not_lost(slurm_cluster, decoder_inputs, tmp_path):  # noqa: F811
    """A time-limit USR1 that reaches the batch shell while the ranks are still importing (their USR1 is ignored
    until the trainer installs its handler: it is inherited from torchrun-ignoring-usr1) must still stop them:
    the shell repeats it every DIVAE_RESIGNAL_S seconds until the step ends. The signal goes to the batch shell
    alone (`scancel --signal=USR1 --batch`), right after it started the step. About 1 minute."""
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = _sbatch(_overrides(decoder_inputs, run_dir, "checkpoint.every=0"), out, "--time=5",
                  env={"DIVAE_MAX_REQUEUES": "0", "DIVAE_RESIGNAL_S": "3"})
    log = lambda: out.read_text() if out.exists() else ""  # noqa: E731
    try:
        wait_until(lambda: "restart 0:" in log(), 120, "the batch shell to start the step", on_timeout=log)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
        wait_until(lambda: job_fields(job)["JobState"] in _ENDED, 150, "the job to end", on_timeout=log)
    finally:
        subprocess.run(["scancel", job], check=False)
    text = log()
    assert text.count("batch shell got SIGUSR1") == 1, text
    m = re.search(rf"checkpoint at step (\d+) saved, exiting with {REQUEUE_EXIT_CODE}", text)
    assert m, text
    assert "not requeueing: already restarted 0 times" in text, text
    saved = int(m.group(1))
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [f"step_{saved:08d}"]
    assert job_fields(job)["JobState"] != "TIMEOUT"


@pytest.mark.slow
@pytest.mark.slurm
def test_plain_scancel_checkpoints_and_ends_the_job(slurm_cluster, decoder_inputs, tmp_path):  # noqa: F811
    """A plain `scancel JOBID` (SIGTERM to the batch shell and every rank: the user's stop) ends the job for
    good: the ranks save a checkpoint at the next step (within the cluster's KillWait of 10 s), exit without
    the requeue marker, and the script does not requeue. About 1 minute."""
    from runtime.signals import STOP_EXIT_CODE
    from trainer.checkpoint import select_checkpoint

    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = _sbatch(_overrides(decoder_inputs, run_dir, "checkpoint.every=2"), out, "--time=10")
    log = lambda: out.read_text() if out.exists() else ""  # noqa: E731
    try:
        wait_until(lambda: len(logged_steps(run_dir)) >= 3, 150, "3 logged training steps", on_timeout=log)
        subprocess.run(["scancel", job], check=True)
        wait_until(lambda: log().count(f"exiting with {STOP_EXIT_CODE}") == 2, 60, "both ranks to save and exit",
                   on_timeout=log)
        # a requeue can only come from the batch shell: the job stays COMPLETING until that shell has ended (by
        # itself or SIGKILLed KillWait = 10 s after the cancel), so once it leaves COMPLETING the answer is final
        wait_until(lambda: job_fields(job)["JobState"] in _ENDED, 60, "the batch shell to end", on_timeout=log)
    finally:
        subprocess.run(["scancel", job], check=False)
    text = log()
    fields = job_fields(job)
    assert fields["JobState"] == "CANCELLED" and fields["Restarts"] == "0", f"{fields}\n{text}"
    assert "batch shell got SIGTERM" in text and "batch shell got SIGUSR1" not in text, text
    assert "requeueing job" not in text and "restart 1:" not in text, text
    m = re.search(rf"checkpoint at step (\d+) saved, exiting with {STOP_EXIT_CODE}", text)
    assert m, text
    saved = int(m.group(1))
    assert select_checkpoint(run_dir / "checkpoints", verify=True).name == f"step_{saved:08d}"
    assert not (run_dir / REQUEUE_MARKER).exists()
    assert max(logged_steps(run_dir)) == saved  # stopped at the step boundary after the signal


@pytest.mark.slow
@pytest.mark.slurm
def test_requeue_on_a_smaller_allocation_resumes_elastically(slurm_cluster, tmp_path):  # noqa: F811
    """One node, one rank per CPU held (NPROC_PER_NODE=cpus), MDS shards: 2 CPUs -> 2 ranks; preempted (USR1),
    the requeued job is given 1 CPU before it starts again -> 1 rank, which resumes the checkpoint of 2 ranks
    elastically and finishes the epoch: every sample once. (One node, not 2 -> 1 nodes: the two "nodes" of
    this cluster share /dev/shm, where mosaicml-streaming keeps per-node state.)"""
    from trainer.faults import TRACE_SAMPLES

    inputs = make_decoder_inputs(tmp_path / "in", fmt="mds", variants=4)  # 20 photos
    run_dir, out, trace = tmp_path / "run", tmp_path / "job.out", tmp_path / "trace"
    steps = 10  # one epoch of 20 samples in global batches of 2
    overrides = [f"{k}={v}" for k, v in inputs.items()] + [
        f"train.run_dir={run_dir}", f"train.steps={steps}", "train.batch_size=2", "checkpoint.every=0",
        "logging.every=1", "logging.sample_every=0", "logging.wandb_mode=disabled"]
    env = dict(os.environ, NPROC_PER_NODE="cpus", OMP_NUM_THREADS="1", **{TRACE_SAMPLES: str(trace)})
    job = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mincpus=2", "--mem=0",
         "--time=10", f"--output={out}",
         "slurm/train_decoder.sh", "configs/decoder_tiny.yaml", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    log = lambda: out.read_text() if out.exists() else ""  # noqa: E731
    try:
        wait_until(lambda: len(logged_steps(run_dir)) >= 3, 150, "3 logged training steps", on_timeout=log)
        subprocess.run(["scancel", "--signal=USR1", "--full", job], check=True)
        wait_until(lambda: int(job_fields(job).get("Restarts", 0)) >= 1, 120, "the job to requeue itself",
                   on_timeout=log)
        wait_until(lambda: job_fields(job).get("JobState") == "PENDING", 60, "the requeued job to pend",
                   on_timeout=log)
        subprocess.run(["scontrol", "update", f"JobId={job}", "NumCPUs=1", "MinCPUsNode=1"], check=True)
        start_requeued_now(job)
        wait_until(lambda: job_fields(job)["JobState"] in _ENDED, 180, "the requeued job to finish", on_timeout=log)
    finally:
        subprocess.run(["scancel", job], check=False)
    text = log()
    fields = job_fields(job)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0" and fields["Restarts"] == "1", \
        f"{fields}\n{text}"
    assert "restart 0: 1 node(s) x 2 rank(s)" in text and "restart 1: 1 node(s) x 1 rank(s)" in text, text
    m = re.search(rf"requeueing job {job}: the trainer left \S+/{REQUEUE_MARKER} \(step (\d+)\)", text)
    assert m, text
    saved = int(m.group(1))
    assert 3 <= saved < steps
    second_run = text.split("restart 1:")[1]
    assert re.search(rf"resumed from \S+step_{saved:08d} \(step {saved}\) on 1 ranks \(written by 2: elastic\)",
                     second_run), second_run
    assert logged_steps(run_dir) == list(range(1, steps + 1))  # continued from the saved step, each step once
    seen = []
    for f in trace.glob("samples_rank*.jsonl"):
        seen += [i for line in f.read_text().splitlines() for i in json.loads(line)["index"]]
    assert sorted(seen) == list(range(2 * steps)), sorted(seen)  # every sample of the epoch exactly once
    meta = json.loads((run_dir / "checkpoints" / f"step_{steps:08d}" / "trainer_state.json").read_text())
    assert meta["world_size"] == 1 and meta["samples_seen"] == 2 * steps and meta["grad_accum"] == 2


# -- submitit (trainer.submit) on the cluster ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.slurm
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
