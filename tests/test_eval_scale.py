"""Evaluation at the paper's scale (issue 16): per-image noise independent of batch and ranks, sampling
precision, time-based partial saves, and a SIGUSR1 to a real 2-rank `torchrun -m evaluation.recon_fid` run
that saves within one batch and exits for a requeue; the rerun gives the uninterrupted figure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_fixtures import (  # noqa: F401 - inputs: the tiny DiVAE file and MDS val shards
    N_IMAGES,
    BlurNoiseReconstruct,
    inputs,
    make_dataset,
    run_eval,
)
from helpers import descendants, free_port, kill_tree, torchrun

from evaluation.recon_fid import main
from runtime.signals import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
N = N_IMAGES  # the photos in `inputs`


def args_for(root: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    return ["--checkpoint", str(root / "divae.safetensors"), "--data", str(root / "val"), "--out", str(out),
            "--decoder", "diffusion", "--sampler", "ddpm", "--steps", "6", "--batch-size", str(batch_size),
            "--ref-stats-dir", "", "--num-show", str(N), "--no-lpips", "--save-every", "0", *extra]


def samples(out: Path) -> dict[int, np.ndarray]:
    with np.load(out / "samples.npz") as z:
        return {int(i): r for i, r in zip(z["index"], z["reconstruction"])}


@pytest.fixture(scope="module")
def batch_one(inputs, tmp_path_factory):  # noqa: F811
    """The uninterrupted reference: one process, batch 1."""
    out = tmp_path_factory.mktemp("batch1")
    (res,) = main(args_for(inputs, out, 1))
    return res, out


def test_batch_one_and_batch_eight_give_the_same_images(inputs, batch_one, tmp_path):  # noqa: F811
    ref, ref_out = batch_one
    (res,) = main(args_for(inputs, tmp_path, 8))
    a, b = samples(ref_out), samples(tmp_path)
    assert sorted(a) == list(range(N))
    for i in range(N):
        assert np.array_equal(a[i], b[i]), i  # the same uint8 reconstruction of image i
    assert res["psnr"] == pytest.approx(ref["psnr"], rel=1e-12) and res["ssim"] == pytest.approx(ref["ssim"], rel=1e-12)
    assert res["protocol"]["precision"] == "fp32" and ref["process_group_timeout_s"] is None
    assert ref["precision_effect_measured"]["fid_bf16_minus_fp32"] == pytest.approx(0.3306)  # stated for readers


def test_bf16_decoding_runs_under_autocast_and_stays_close(inputs):  # noqa: F811
    from divae.model import DiVAE
    from evaluation.precision import sampling_precision
    from evaluation.recon_fid import make_divae_reconstruct

    model = DiVAE.from_pretrained(inputs / "divae.safetensors")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.unet.parameters():  # undo zero-init so the UNet's output (and its precision) matters
            if (p == 0).all():
                p.normal_(0, 0.05)
    images = torch.from_numpy(np.stack(make_dataset(2))).permute(0, 3, 1, 2).contiguous()
    idx = torch.tensor([3, 5])
    dtypes = []
    hook = model.unet.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    try:
        fp32, _ = make_divae_reconstruct(model, "diffusion", "ddpm", 4, 0, torch.device("cpu"), "fp32")(images, idx)
        assert dtypes and set(dtypes) == {torch.float32}
        dtypes.clear()
        bf16, _ = make_divae_reconstruct(model, "diffusion", "ddpm", 4, 0, torch.device("cpu"), "bf16")(images, idx)
    finally:
        hook.remove()
    assert dtypes and set(dtypes) == {torch.float32}  # the UNet's fp32 output edge, inside autocast
    diff = (fp32.int() - bf16.int()).abs().float()
    assert 0 < diff.mean() < 3  # bf16 moves pixels a little, not the picture
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the region really is bf16 inside
        assert torch.nn.functional.linear(torch.ones(1, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    before = torch.backends.cuda.matmul.allow_tf32
    with sampling_precision("tf32", "cpu"):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before
    with pytest.raises(ValueError, match="precision"), sampling_precision("fp16", "cpu"):
        pass


def test_evaluation_is_bf16_on_cuda_and_fp32_on_cpu_by_default():
    from evaluation.precision import resolve_precision, sampling_precision

    assert resolve_precision(None, "cuda") == "bf16" and resolve_precision(None, torch.device("cuda", 1)) == "bf16"
    assert resolve_precision(None, "cpu") == "fp32"
    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("tf32", "cpu") == "tf32"  # as asked
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", "cuda")
    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")
    before = [getattr(m, a) for m, a in flags]
    with sampling_precision("bf16", "cpu"):  # bf16: its fp32 parts (edges, sampler) on TF32 tensor cores
        assert all(getattr(m, a) for m, a in flags)
    with sampling_precision("fp32", "cpu"):  # fp32: the exact reference
        assert not any(getattr(m, a) for m, a in flags)
    assert [getattr(m, a) for m, a in flags] == before


def test_time_based_and_signal_saves_in_process(tmp_path):
    from evaluation.protocol import Preempted
    from runtime import signals

    ref = tmp_path / "ref.npz"  # the real images' Inception statistics, computed once for the seven runs

    # every batch boundary is past a tiny --save-every-min: a crash at batch 3 finds batch 2's sums on disk
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval(tmp_path / "t", batch_size=2, save_every=0, ref_stats_path=ref,
                 reconstruct=BlurNoiseReconstruct(fail_after=2),
                 save_every_min=1e-9)
    assert json.loads((tmp_path / "t" / "partial" / "rank00000-of-00001.json").read_text())["pos"] == 4
    with pytest.raises(RuntimeError, match="simulated crash"):  # no saving asked for: nothing on disk
        run_eval(tmp_path / "n", batch_size=2, save_every=0, ref_stats_path=ref,
                 reconstruct=BlurNoiseReconstruct(fail_after=2))
    assert not (tmp_path / "n" / "partial" / "rank00000-of-00001.json").exists()

    class SignalAt(BlurNoiseReconstruct):
        sig = signal.SIGUSR1

        def __call__(self, images, idx):
            if self.calls == 1:  # during the 2nd batch
                os.kill(os.getpid(), self.sig)
            return super().__call__(images, idx)

    class TermAt(SignalAt):
        sig = signal.SIGTERM

    signals.install()  # SIGTERM (a plain scancel) also saves and stops, but the CLI does not requeue
    try:
        with pytest.raises(Preempted, match="SIGTERM") as term:
            run_eval(tmp_path / "term", batch_size=2, save_every=0, ref_stats_path=ref, reconstruct=TermAt(),
                     stop_on_signals=True)
    finally:
        signals.restore()
    from runtime.signals import REQUEUE_EXIT_CODE, STOP_EXIT_CODE, exit_for_signal

    assert term.value.pos == 4 and exit_for_signal(term.value.signum) == (STOP_EXIT_CODE, False)
    assert exit_for_signal(signal.SIGUSR1) == (REQUEUE_EXIT_CODE, True)

    signals.install()
    try:
        with pytest.raises(Preempted, match="SIGUSR1") as info:
            run_eval(tmp_path / "s", batch_size=2, save_every=0, ref_stats_path=ref, reconstruct=SignalAt(),
                     stop_on_signals=True)
    finally:
        signals.restore()
    assert info.value.pos == 4  # saved at the end of the batch the signal arrived in
    assert json.loads((tmp_path / "s" / "partial" / "rank00000-of-00001.json").read_text())["pos"] == 4
    rec = BlurNoiseReconstruct()
    resumed = run_eval(tmp_path / "s", batch_size=2, save_every=0, ref_stats_path=ref, reconstruct=rec)
    full = run_eval(tmp_path / "full", batch_size=2, save_every=0, ref_stats_path=ref)
    assert resumed["resumed"] and rec.calls == 2
    assert resumed["fid"] == pytest.approx(full["fid"], rel=1e-12) and resumed["psnr"] == full["psnr"]


def _torchrun(args: list[str]) -> subprocess.Popen:
    """torchrun with 2 ranks in its own session; torchrun ignores USR1 as under slurm/recon_fid.sh (the ranks
    install their own handler)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = ["bash", "-c", 'trap "" USR1; exec "$@"', "torchrun-ignoring-usr1",
           *torchrun(2, "-m", "evaluation.recon_fid", *args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        log, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # timed out: SIGKILL torchrun and its ranks
            kill_tree(proc)
    return log.decode()


@pytest.mark.slow
def test_sigusr1_to_two_ranks_saves_within_a_batch_and_rerun_gives_the_same_figure(inputs, batch_one,  # noqa: F811
                                                                                   tmp_path):
    ref, ref_out = batch_one
    out = tmp_path / "two"
    args = args_for(inputs, out, 1, "--save-every", "1")  # progress on disk after every batch, to aim the signal
    progress = [out / "partial" / f"rank{r:05d}-of-00002.json" for r in range(2)]
    proc = _torchrun(args)
    deadline = time.time() + 300
    pos = [0, 0]
    while min(pos) < 1:
        pos = [json.loads(p.read_text())["pos"] if p.is_file() else 0 for p in progress]
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"torchrun ended or stalled before the signal (progress {pos}):\n"
                                 + _finish(proc, 10)[-3000:])
        time.sleep(0.05)
    for pid in [proc.pid, *descendants(proc.pid)]:  # as srun signals every process of the step
        os.kill(pid, signal.SIGUSR1)
    log = _finish(proc, 300)
    assert proc.returncode != 0, log[-3000:]  # torchrun reports its ranks' exit code 75 as a failure
    assert f"exiting with code {REQUEUE_EXIT_CODE}" in log and "partial sums saved on SIGUSR1" in log, log[-3000:]
    saved = [json.loads(p.read_text())["pos"] for p in progress]
    assert saved[0] == saved[1] and pos[0] <= saved[0] <= pos[0] + 2  # the batch it was in, at most the next
    assert saved[0] < 4 and (out / "REQUEUE").is_file() and not (out / "results.json").exists()

    proc = _torchrun(args)
    log = _finish(proc, 300)
    assert proc.returncode == 0, log[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["resumed"] and res["images_this_session"] < N and not (out / "REQUEUE").exists()
    assert res["protocol"]["world_size"] == 2 and res["process_group_timeout_s"] == 120 * 60
    # the same images as one process with batch 1, so the same figures (FID: Inception batch rounding only)
    a, b = samples(ref_out), samples(out)
    for i in range(N):
        assert np.array_equal(a[i], b[i]), i
    assert res["fid"] == pytest.approx(ref["fid"], rel=1e-4)
    assert res["psnr"] == pytest.approx(ref["psnr"], rel=1e-12) and res["ssim"] == pytest.approx(ref["ssim"], rel=1e-12)


SRUN = r'''#!/bin/bash
# srun stand-in for one node: run the step, and forward USR1/TERM to every process of it as srun does.
while [[ $1 == --* ]]; do shift; done
"$@" &
step=$!
desc() { local c; for c in $(pgrep -P "$1"); do echo "$c"; desc "$c"; done; }
fwd() { kill -s "$1" "$step" $(desc "$step") 2>/dev/null; }
trap 'fwd USR1' USR1
trap 'fwd TERM' TERM
while :; do wait "$step"; rc=$?; kill -0 "$step" 2>/dev/null || exit "$rc"; done
'''
SCONTROL = r'''#!/bin/bash
# scontrol stand-in: the node list is this machine; `requeue` is recorded.
case "$1 $2" in
    "show hostnames") echo 127.0.0.1 ;;
    "show job") ;;
    requeue*) echo "$@" >> "$SCONTROL_LOG" ;;
esac
'''


@pytest.mark.slow
def test_slurm_script_forwards_usr1_and_requeues_after_the_save(inputs, tmp_path):  # noqa: F811
    """slurm/recon_fid.sh as the batch shell of a job: USR1 (what `--signal=B:USR1@120` sends) is forwarded to
    the step, the real 2-rank torchrun evaluation saves and exits 75, and the script requeues the job. Slurm's
    own srun/scontrol are stand-ins (the cluster test of the train scripts is tests/test_slurm.py)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "eval"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="1",
               SLURM_JOB_NODELIST="localhost", SLURM_CPUS_PER_TASK="2", NPROC_PER_NODE="2", DIVAE_ROOT=str(ROOT),
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", SCONTROL_LOG=str(tmp_path / "scontrol.log"))
    proc = subprocess.Popen(["bash", str(ROOT / "slurm/recon_fid.sh"), *args_for(inputs, out, 1, "--save-every", "1")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    progress = out / "partial" / "rank00000-of-00002.json"
    deadline = time.time() + 300
    while not progress.is_file():
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError("the job ended or stalled before the signal:\n" + _finish(proc, 10)[-3000:])
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)  # to the batch shell only, as Slurm's --signal=B:USR1 does
    log = _finish(proc, 300)
    assert proc.returncode == 0, log[-3000:]
    assert "partial sums saved on SIGUSR1" in log and "requeueing job 4242" in log, log[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert json.loads(progress.read_text())["pos"] < 4 and not (out / "REQUEUE").exists()
