"""Multi-node launch (issue 25, item 7): the rendezvous address from the Slurm node list, passed explicitly; a
one-line refusal when the GPUs per node cannot be told; NCCL's flight recorder; a start-up timeout apart from
the collective timeout. slurm/_common.sh runs for real in bash; only Slurm's and NVIDIA's programs (scontrol,
srun, nvidia-smi) and torchrun are stand-ins that record what they were given."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import free_port  # tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]
STUBS = {
    "scontrol": '#!/bin/bash\n[[ "$1 $2 $3" == "show hostnames gpu[07-08]" ]] && printf "gpu07\\ngpu08\\n"\n',
    # srun: drop its options, run the step (the torchrun wrapper) as Slurm would on node gpu08
    "srun": '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nSLURMD_NODENAME=gpu08 exec "$@"\n',
    "torchrun": '#!/bin/bash\nprintf "%s\\n" "$@" > "$ARGV_LOG"\n',
}


def _common(tmp_path: Path, gpus_on_node: str | None, nvidia_gpus: int) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stubs = dict(STUBS, **({"nvidia-smi": "#!/bin/bash\n" + "".join(
        f'echo "GPU {i}: NVIDIA H100 (UUID: GPU-{i})"\n' for i in range(nvidia_gpus))} if nvidia_gpus else {}))
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    venv = tmp_path / "venv"  # activates the real venv with the stand-ins first (its torchrun would win)
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "bin" / "activate").write_text(f'PATH="{bin_dir}:{Path(sys.executable).parent}:$PATH"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "NPROC", "MASTER", "DIVAE"))}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", SLURM_JOB_ID="123", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="gpu[07-08]", SLURM_SUBMIT_DIR=str(tmp_path), DIVAE_ROOT=str(ROOT),
               DIVAE_VENV=str(venv), ARGV_LOG=str(tmp_path / "argv"))
    if gpus_on_node is not None:
        env["SLURM_GPUS_ON_NODE"] = gpus_on_node
    script = f'source "{ROOT}/slurm/_common.sh"; divae_train configs/decoder_tiny.yaml train.steps=1'
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_torchrun_gets_the_first_slurm_host_and_its_own_node_name(tmp_path):
    r = _common(tmp_path, gpus_on_node="4", nvidia_gpus=4)
    assert r.returncode == 0, r.stderr[-2000:]
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[0] == "--local-addr=gpu08"  # the node's Slurm name: what MASTER_ADDR becomes if it hosts rank 0
    assert f"--rdzv_endpoint=gpu07:{20000 + 123}" in argv and "--nproc_per_node=4" in argv and "--nnodes=2" in argv
    assert argv[argv.index("-m") + 1] == "trainer.train"


def test_unknown_gpus_per_node_is_refused_in_one_line(tmp_path):
    r = _common(tmp_path, gpus_on_node=None, nvidia_gpus=8)
    assert r.returncode == 2 and not (tmp_path / "argv").exists()
    assert len(r.stderr.strip().splitlines()) == 1 and "--gpus-per-node" in r.stderr, r.stderr


def test_flight_recorder_variables_and_the_start_up_timeout(tmp_path):
    from runtime.launch import flight_recorder_env, init_timeout_s

    fr = flight_recorder_env({"DIVAE_NCCL_DUMP_DIR": str(tmp_path)})
    assert fr == {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                  "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": f"{tmp_path}/nccl_trace_rank_"}
    assert "TORCH_NCCL_TRACE_BUFFER_SIZE" not in flight_recorder_env({"TORCH_NCCL_TRACE_BUFFER_SIZE": "0"})
    assert init_timeout_s({}, 1800) == 300 and init_timeout_s({"DIVAE_INIT_TIMEOUT_S": "60"}, 30) == 30


def test_a_rank_that_never_comes_up_fails_the_start_in_the_short_timeout():
    """Rank 0 of 2 alone: it fails after DIVAE_INIT_TIMEOUT_S (3 s), not the 30-minute collective timeout."""
    port = free_port()
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), DIVAE_INIT_TIMEOUT_S="3", PYTHONPATH=str(ROOT))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", "from runtime.launch import init_distributed\n"
                        "init_distributed(1800, engines=False)"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Timed out" in r.stderr, r.stderr[-2000:]
    assert time.time() - t0 < 60


def test_after_start_up_the_group_has_the_collective_timeout(monkeypatch):
    from runtime.launch import cleanup, init_distributed, process_group_timeout_s

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("DIVAE_INIT_TIMEOUT_S", "20")
    saved = dict(os.environ)
    cleanup()  # a group an earlier test in this process left behind would be reused as it is
    try:
        init_distributed(1234)
        assert process_group_timeout_s() == 1234
    finally:
        cleanup()
        os.environ.clear()
        os.environ.update(saved)


def test_an_evaluation_process_group_does_not_import_deepspeed():
    """`init_distributed(engines=False)` (the evaluation CLIs, two ranks here) sets up plain torch.distributed:
    DeepSpeed, which only the training engines need, is not imported (about a second per evaluation process)."""
    port = free_port()
    code = ("import sys\nfrom runtime.launch import cleanup, init_distributed\n"
            "init_distributed(60, engines=False)\nimport torch.distributed as d\nd.barrier()\ncleanup()\n"
            "print('deepspeed' in sys.modules)")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=dict(
        os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert [o.strip() for o, _ in outs] == ["False", "False"]
