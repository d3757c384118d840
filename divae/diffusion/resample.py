"""Schedule samplers: how training draws timesteps, with importance weights that keep the loss unbiased.

`sample` returns (t (B,) long, weights (B,) float32); multiply the per-sample loss by the weights before
averaging. `LossSecondMomentResampler` (Improved DDPM) draws t with probability proportional to
sqrt(E[L_t^2]) once it has `history_per_term` losses for every t, which lowers the variance of L_vlb.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


class ScheduleSampler:
    """Base class: subclasses define `weights()` -> unnormalised probabilities (T,)."""

    num_timesteps: int

    def weights(self) -> np.ndarray:
        raise NotImplementedError

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights()
        p = torch.from_numpy(w / w.sum())
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (len(p) * p[t])
        return t.to(device), weights.float().to(device)


class UniformSampler(ScheduleSampler):
    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def weights(self) -> np.ndarray:
        return np.ones(self.num_timesteps, dtype=np.float64)


class LossSecondMomentResampler(ScheduleSampler):
    """Importance sampling by the second moment of recent per-timestep losses.

    Feed it every step with `update_with_local_losses(t, losses)` (gathers across ranks when
    torch.distributed is initialised, so every rank keeps the same history) or `update_with_all_losses`.
    Its history is saved through `state_dict()` / `load_state_dict()`.
    """

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.num_timesteps = num_timesteps
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros((num_timesteps, history_per_term), dtype=np.float64)
        self._loss_counts = np.zeros(num_timesteps, dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        w /= w.sum()
        w *= 1 - self.uniform_prob
        w += self.uniform_prob / len(w)
        return w

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def update_with_local_losses(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """t, losses: (B,) from this rank. All ranks must call this together when distributed."""
        t, losses = t.detach(), losses.detach().float()
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(world)]
            dist.all_gather(sizes, torch.tensor([len(t)], dtype=torch.long, device=t.device))
            n = max(int(s.item()) for s in sizes)
            t_pad = torch.zeros(n, dtype=torch.long, device=t.device)
            l_pad = torch.zeros(n, dtype=torch.float32, device=t.device)
            t_pad[: len(t)], l_pad[: len(t)] = t, losses
            ts_all = [torch.zeros_like(t_pad) for _ in range(world)]
            ls_all = [torch.zeros_like(l_pad) for _ in range(world)]
            dist.all_gather(ts_all, t_pad)
            dist.all_gather(ls_all, l_pad)
            t_list = [v for xs, s in zip(ts_all, sizes) for v in xs[: int(s.item())].tolist()]
            l_list = [v for xs, s in zip(ls_all, sizes) for v in xs[: int(s.item())].tolist()]
        else:
            t_list, l_list = t.tolist(), losses.tolist()
        self.update_with_all_losses(t_list, l_list)

    def update_with_all_losses(self, ts: list[int], losses: list[float]) -> None:
        for t, loss in zip(ts, losses):
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def state_dict(self) -> dict:
        return {"loss_history": self._loss_history.copy(), "loss_counts": self._loss_counts.copy()}

    def load_state_dict(self, state: dict) -> None:
        self._loss_history = np.asarray(state["loss_history"], dtype=np.float64).copy()
        self._loss_counts = np.asarray(state["loss_counts"], dtype=np.int64).copy()


def create_schedule_sampler(name: str, num_timesteps: int) -> ScheduleSampler:
    """"uniform" or "loss-second-moment"."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(num_timesteps)
    raise ValueError(f"unknown schedule sampler {name!r}; choose 'uniform' or 'loss-second-moment'")
