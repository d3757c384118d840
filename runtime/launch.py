"""Launch-environment detection and process-group set-up.

Three ways a trainer process can be started, detected in this order:

1. `torchrun` (or any launcher that exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT),
   including one `srun` task per node that starts `torchrun` (the Slurm scripts);
2. `srun` with one task per process: rank, world size and local rank from SLURM_PROCID / SLURM_NTASKS /
   SLURM_LOCALID, MASTER_ADDR = first host of `scontrol show hostnames $SLURM_JOB_NODELIST`, MASTER_PORT
   from the environment or derived from the job id;
3. a plain `python -m trainer.train`: one process, rank 0 of 1, on a free local port.

The backend is chosen from the device: nccl on CUDA, gloo on CPU. The CUDA device is `cuda:LOCAL_RANK`, or
`cuda:0` when the process sees a single GPU (sites that bind one GPU per srun task through
CUDA_VISIBLE_DEVICES, e.g. `--gpus-per-task=1` or `--gpu-bind=single:1`): see `cuda_device_index`.
On CPU, DeepSpeed's shared-memory all-reduce extension (`deepspeed_shm_comm`, a ~30 s g++ build on a cold
cache) is switched off: DeepSpeed only uses it for `inference_all_reduce`, never in training, where every
collective goes through torch.distributed (gloo). `DIVAE_DS_SHM_COMM=1` keeps DeepSpeed's default.

Two timeouts: start-up (`DIVAE_INIT_TIMEOUT_S`, default 300 s) bounds the rendezvous and a first barrier, so a
rank that never comes up fails the job in minutes; then the group's timeout is raised to the collective
timeout (30 min in training) for the run. On NCCL the flight recorder is on (`flight_recorder_env`): each
rank keeps its last 2000 collectives and dumps them to `$DIVAE_NCCL_DUMP_DIR` (default ./nccl_dumps) as
nccl_trace_rank_<r> when a collective times out (read them with torch's `torchfrtrace`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from divae.utils.logging import get_logger
from runtime import collectives

log = get_logger(__name__)
INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT_S = "DIVAE_INIT_TIMEOUT_S", 300.0
NCCL_DUMP_ENV = "DIVAE_NCCL_DUMP_DIR"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank/world size, rank and count on this node, device, backend."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    launcher: str  # "torchrun" | "srun" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The rendezvous variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    LAUNCHER) implied by the environment `env` (default os.environ); pure apart from `scontrol`/port lookup."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        out = {k: env[k] for k in ("RANK", "WORLD_SIZE")}
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
        out["LOCAL_WORLD_SIZE"] = env.get("LOCAL_WORLD_SIZE", "1")
        out["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in env and int(env["WORLD_SIZE"]) > 1:
            raise RuntimeError("RANK and WORLD_SIZE are set but MASTER_PORT is not; launch with torchrun or "
                               "export MASTER_ADDR and MASTER_PORT")
        out["MASTER_PORT"] = env.get("MASTER_PORT") or str(_free_port())
        out["LAUNCHER"] = "torchrun"
        return out
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        ntasks_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE", "1")
        out = {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": ntasks_node.split("(")[0].split(",")[0],
            "MASTER_ADDR": env.get("MASTER_ADDR") or _first_slurm_host(env),
            "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
            "LAUNCHER": "srun",
        }
        return out
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": env.get("MASTER_PORT") or str(_free_port()),
            "LAUNCHER": "single"}


def _first_slurm_host(env: dict[str, str]) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("srun launch without SLURM_JOB_NODELIST: cannot find the master node; set MASTER_ADDR")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"`scontrol show hostnames {nodelist}` failed ({e}); set MASTER_ADDR yourself") from e
    if not out:
        raise RuntimeError(f"`scontrol show hostnames {nodelist}` printed no host; set MASTER_ADDR yourself")
    return out[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_shm_comm_build() -> None:
    """Mark DeepSpeed's CPU shared-memory comm op as unavailable (see the module docstring)."""
    if os.environ.get("DIVAE_DS_SHM_COMM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device of the rank with `local_rank` when it sees `visible` devices: 0 when it sees one (the
    launcher bound one GPU to each task), else its local rank."""
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise RuntimeError(f"local rank {local_rank} but this process sees {visible} CUDA devices "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): launch one "
                       "rank per visible GPU, or bind one GPU per task")


def flight_recorder_env(env: Mapping[str, str]) -> dict[str, str]:
    """The NCCL flight-recorder variables to export, those `env` does not set already: a ring of the last 2000
    collectives per rank, dumped to <$DIVAE_NCCL_DUMP_DIR or ./nccl_dumps>/nccl_trace_rank_<rank> on a timeout."""
    dump = Path(env.get(NCCL_DUMP_ENV) or "nccl_dumps").resolve()
    want = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": f"{dump}/nccl_trace_rank_"}
    return {k: v for k, v in want.items() if k not in env}


def init_timeout_s(env: Mapping[str, str], timeout_s: float) -> float:
    """Seconds the ranks have to find each other at start-up: $DIVAE_INIT_TIMEOUT_S (default 300), at most
    the collective timeout `timeout_s`."""
    return min(float(env.get(INIT_TIMEOUT_ENV) or DEFAULT_INIT_TIMEOUT_S), timeout_s)


def _init_group(backend: str, world: int, timeout_s: float) -> None:
    """init_process_group with the short start-up timeout, a barrier under it (every rank is up), then the
    collective timeout `timeout_s` for the rest of the run (the group's and its store's). One process gets an
    in-process store, so its exported MASTER_PORT is never bound."""
    init_timeout = timedelta(seconds=init_timeout_s(os.environ, timeout_s))
    if world == 1:  # an in-process store: no TCP port to pick, so none another process can take meanwhile
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1,
                                             timeout=init_timeout)
    else:
        torch.distributed.init_process_group(backend, timeout=init_timeout)
        torch.distributed.barrier()
    torch.distributed.set_timeout(timedelta(seconds=timeout_s))
    torch.distributed.distributed_c10d._get_default_store().set_timeout(timedelta(seconds=timeout_s))


def init_distributed(timeout_s: float = 1800, *, engines: bool = True) -> DistInfo:
    """Detect the launcher, export the rendezvous variables, pick device and backend, and initialise
    torch.distributed with a `timeout_s` collective timeout (start-up: `init_timeout_s`). `engines=True`
    (training): DeepSpeed's communication on that group, also for one process (DeepSpeed engines need a group).
    `engines=False` (evaluation): plain torch.distributed, and no group at all for a single process."""
    found = detect_env()
    launcher = found.pop("LAUNCHER")
    for k, v in found.items():
        os.environ[k] = v
    rank, world = int(found["RANK"]), int(found["WORLD_SIZE"])
    local_rank, local_world = int(found["LOCAL_RANK"]), int(found["LOCAL_WORLD_SIZE"])
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", cuda_device_index(local_rank, torch.cuda.device_count())), "nccl"
        torch.cuda.set_device(device)
        os.environ.update(flight_recorder_env(os.environ))
        Path(os.environ["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"]).parent.mkdir(parents=True, exist_ok=True)
    else:
        device, backend = torch.device("cpu"), "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            # Several ranks on one box fight over the cores: a 6x slow-down on 2 cores without this.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    if not torch.distributed.is_initialized() and (engines or world > 1):
        _init_group(backend, world, timeout_s)
    if engines:  # DeepSpeed's communication backend on the group made above (evaluation never imports DeepSpeed)
        if backend == "gloo":
            _skip_shm_comm_build()
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s),
                                   auto_mpi_discovery=False, verbose=False)
    collectives.set_device(device)
    info = DistInfo(rank, world, local_rank, local_world, device, backend, launcher)
    log.info("distributed: %s launch, world size %d, backend %s, device %s", launcher, world, backend, device)
    return info


def process_group_timeout_s() -> float | None:
    """The collective timeout of the default process group, in seconds (None when there is no group)."""
    if not torch.distributed.is_initialized():
        return None
    kind = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    backend = torch.distributed.group.WORLD._get_backend(torch.device(kind))
    return backend.options._timeout.total_seconds()


def cleanup() -> None:
    """Destroy the process group, and DeepSpeed's groups cached from it (a later init_distributed in the same
    process, e.g. two runs in one process or one test module after another, would otherwise build its engines
    on groups of the destroyed one: "Group ... is not registered")."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP"):
        setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_DATA_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS"):
        getattr(groups, name, {}).clear()
