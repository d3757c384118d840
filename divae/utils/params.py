"""The one parameter counter (torch-free: any module with `.parameters()`)."""

from __future__ import annotations

from typing import Any


def count_parameters(module: Any) -> int:
    """Number of scalar parameters of `module` (buffers such as an EMA codebook are not counted)."""
    return sum(p.numel() for p in module.parameters())
