"""Agreement primitives on Python objects and numbers across the ranks of the default process group.

Each is a collective (every rank calls it, in the same order) when torch.distributed is initialised with more
than one rank, and a no-op on the value otherwise, so single-process code paths need no branch. Small numbers
travel on the rank's device (`set_device`, called by `runtime.launch.init_distributed`): NCCL only moves CUDA
tensors.
"""

from __future__ import annotations

import torch

_DEVICE = torch.device("cpu")  # where small collectives run: the rank's device after init_distributed


def set_device(device: torch.device) -> None:
    """The device of this rank's small collectives (CUDA under NCCL, CPU under gloo)."""
    global _DEVICE
    _DEVICE = device


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_max(value: float) -> float:
    """max over ranks of a Python number (a cheap agreement primitive)."""
    return _all_reduce_number(value, torch.distributed.ReduceOp.MAX)


def all_reduce_sum(value: float) -> float:
    """Sum over ranks of a Python number."""
    return _all_reduce_number(value, torch.distributed.ReduceOp.SUM)


def _all_reduce_number(value: float, op) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=_DEVICE)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=op)
    return float(t.item())


def all_gather_object(obj: object) -> list:
    """[obj of rank 0, obj of rank 1, ...] (a collective; [obj] without torch.distributed)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        out = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank (a collective; `obj` itself without torch.distributed)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1) when it is not initialised."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
