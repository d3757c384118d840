"""The one parameter counter and the one state-dict slicer (torch-free: any module with `.parameters()`, any
mapping of names)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

V = TypeVar("V")


def count_parameters(module: Any) -> int:
    """Number of scalar parameters of `module` (buffers such as an EMA codebook are not counted)."""
    return sum(p.numel() for p in module.parameters())


def sub_state(state: Mapping[str, V], prefix: str) -> dict[str, V]:
    """The entries of `state` under `prefix` ("vq", "unet", "prior"), named as the submodule's own state dict
    names them: sub_state({"vq.enc.w": a, "unet.x": b}, "vq") == {"enc.w": a}."""
    head = prefix + "."
    return {k[len(head):]: v for k, v in state.items() if k.startswith(head)}
