"""The `tokens` column of pre-encoded shards (written by `trainer.pre_encode`, read by the decoder and prior stages).

One value per image: its (h, w) grid of VQ code indices in C order, int16 when K <= 32768, else int32.
"""

from __future__ import annotations

import numpy as np
import torch


def tokens_dtype(n_embed: int) -> np.dtype:
    """The stored integer type for a codebook of n_embed codes."""
    return np.dtype(np.int16) if n_embed <= 2**15 else np.dtype(np.int32)


def tokens_from_bytes(values, h: int, w: int | None = None, dtype: np.dtype | None = None) -> torch.Tensor:
    """Stored `tokens` values (one bytes object per image, or an already decoded tensor) -> LongTensor (B, h, w).

    dtype: the stored type when the reader knows K (`tokens_dtype`); None infers int16 or int32 from each value's
    length. A value of the wrong size (another image size or VQ) is a ValueError that says so.
    """
    w = h if w is None else w
    if isinstance(values, torch.Tensor):
        return values.long().view(-1, h, w)
    out = []
    for v in values:
        itemsize = dtype.itemsize if dtype is not None else len(v) // (h * w)
        if itemsize not in (2, 4) or itemsize * h * w != len(v):
            want = f"{dtype.name}" if dtype is not None else "int16/int32"
            raise ValueError(f"a `tokens` value has {len(v)} bytes, which is not a {h}x{w} {want} grid: the shards "
                             "were pre-encoded for another image size or VQ")
        out.append(np.frombuffer(v, dtype=np.int16 if itemsize == 2 else np.int32).reshape(h, w))
    return torch.from_numpy(np.stack(out).astype(np.int64))
