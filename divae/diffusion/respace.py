"""Timestep respacing: run a diffusion trained with T steps on a subset of them.

The kept steps t_0 < t_1 < ... < t_{K-1} define a new K-step diffusion whose cumulative alphas equal the
original ones at the kept steps, so beta'_i = 1 - abar[t_i] / abar[t_{i-1}]. The model is still called
with the original timestep t_i (through `_TimestepMap`), so a model trained at T steps needs no change.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """Timesteps to keep out of `num_timesteps`.

    section_counts:
      "quadN": N steps quadratic in time, t_i = round((i / (N-1))^2 (T-1)), dense near t = 0 (DPM-Solver's
          "time_quadratic"; the default of the dpmpp2m sampler);
      "ddimN": every (T/N)-th step starting at 0 (the DDIM paper's spacing; some integer stride must give
          exactly N steps);
      "N" or [N]: N evenly spaced steps including 0 and T - 1 (improved-diffusion's convention, so that a
          respaced sampler visits the same steps: the fractional stride (size-1)/(N-1) is accumulated by
          repeated addition and each position rounded half to even, Python's `round`);
      "10,15,20": split [0, T) into 3 equal sections and keep 10, 15 and 20 evenly spaced steps in them.
    """
    if isinstance(section_counts, str):
        section_counts = section_counts.strip()
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot make exactly {want} steps from {num_timesteps} with an integer stride")
        if section_counts.startswith("quad"):
            return _quadratic_timesteps(num_timesteps, int(section_counts[len("quad"):]))
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep_respacing {section_counts!r}: expected 'ddimN', 'N' or 'N1,N2,...'"
            ) from None
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start = 0
    kept: list[int] = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        pos = 0.0
        for _ in range(count):  # accumulated, not stride * j: the two round differently at .5 ties
            kept.append(start + round(pos))
            pos += stride
        start += size
    return set(kept)


def _quadratic_timesteps(num_timesteps: int, n: int) -> set[int]:
    if not 2 <= n <= num_timesteps:
        raise ValueError(f"quad{n}: need 2 <= steps <= {num_timesteps}")
    kept: list[int] = []
    for i in range(n):
        t = round((i / (n - 1)) ** 2 * (num_timesteps - 1))
        # keep the steps distinct where the parabola is flatter than one step, without passing T - 1
        kept.append(min(max(t, kept[-1] + 1 if kept else 0), num_timesteps - (n - i)))
    return set(kept)


class _TimestepMap:
    """Calls `model(x, timestep_map[t], **kw)`: respaced index -> original timestep."""

    def __init__(self, model: Callable, timestep_map: list[int], tables: dict):
        self.model = model
        self.timestep_map = timestep_map
        self._tables = tables  # device -> LongTensor, shared by the wrappers of one diffusion

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs):
        table = self._tables.get(t.device)
        if table is None:
            table = self._tables[t.device] = torch.tensor(self.timestep_map, device=t.device, dtype=torch.long)
        return self.model(x, table[t], **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A `GaussianDiffusion` over the kept steps `use_timesteps` of a base schedule `betas`.

    Timesteps passed to its methods are indices 0..K-1 into the kept steps; `timestep_map[i]` is the
    original timestep the model sees.
    """

    def __init__(self, use_timesteps, *, betas: np.ndarray, **kwargs):
        base = GaussianDiffusion(betas=betas, **kwargs)
        self.base_num_timesteps = base.num_timesteps
        self.use_timesteps = sorted(set(int(t) for t in use_timesteps))
        if not self.use_timesteps or self.use_timesteps[0] < 0 or self.use_timesteps[-1] >= base.num_timesteps:
            raise ValueError(f"kept timesteps must lie in [0, {base.num_timesteps})")
        self.timestep_map: list[int] = []
        new_betas = []
        last_abar = 1.0
        for t in self.use_timesteps:
            abar = base.alphas_cumprod[t]
            new_betas.append(1 - abar / last_abar)
            last_abar = abar
            self.timestep_map.append(t)
        super().__init__(betas=np.array(new_betas), **kwargs)
        self._map_tables: dict[torch.device, torch.Tensor] = {}

    def wrap_model(self, model: Callable) -> Callable:
        if isinstance(model, _TimestepMap):
            return model
        return _TimestepMap(model, self.timestep_map, self._map_tables)
