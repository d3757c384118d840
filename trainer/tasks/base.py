"""The interface between the training loop and a stage: a small `Task` object.

The loop (trainer/train.py) knows nothing of stages. For every micro-batch it calls, for each of the
task's `phases` (one per DeepSpeed engine, e.g. ("model",) or ("generator", "discriminator")):

    loss, metrics = task.loss(batch, phase, step)   # None: this phase sits this step out
    engines[phase].backward(loss); engines[phase].step()

and every `logging.sample_every` steps `task.sample(batch)` -> {row name: images (B, 3, H, W) in [-1, 1]}
for the PNG grid; every `logging.val_every` steps `task.val_metrics(batch, step)` on held-out batches
(trainer/validation.py). `build_models()` returns the trainable module of each phase (DeepSpeed wraps them);
`attach(engines)` hands the engines back. `export(path, weights)` writes the weights-only file
(`export_name`: the DiVAE file, or the prior's).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from divae.utils.config import ConfigError

COMMON_SECTIONS = ("train", "data", "optim", "deepspeed", "ema", "checkpoint", "logging")


class Task:
    config_sections: tuple[str, ...] = COMMON_SECTIONS  # the TrainConfig sections this stage reads
    phases: tuple[str, ...] = ("model",)
    ema_phases: tuple[str, ...] = ("model",)  # engines whose weights get an EMA
    max_zero_stage: int = 3
    export_name: str = "divae.safetensors"  # file name of `export` in each checkpoint and in the run folder

    vq_cfg: Any = None  # the VQ's config once `build_models` ran: the frozen one of a UNet stage, the VQ stage's own

    def __init__(self, cfg: Any, device: torch.device):
        self.cfg, self.device = cfg, device
        self.engines: dict[str, Any] = {}

    # ---- the stage from its config alone (no weights, no process group): what preflight checks, and what the
    # planner (trainer/plan.py) and the MFU log (trainer/flops.py) count. A new stage defines these here, so that
    # neither module holds a branch per stage.
    @classmethod
    def required_files(cls, cfg: Any) -> list[tuple[str, str, str]]:
        """(config key, value, example) of each file the stage reads besides the data, checked before any rank
        starts: a given path must be a file; an empty value is refused when there is an example (required)."""
        return []

    @classmethod
    def check_required(cls, cfg: Any) -> None:
        """Refuse, in one line, an empty setting that `required_files` marks as required (preflight and
        `build_models` both call this: one message for each)."""
        for key, value, example in cls.required_files(cfg):
            if not value and example:
                raise ConfigError(f"{key} is required: {example}")

    @classmethod
    def frozen_vq_config(cls, cfg: Any) -> Any:
        """The config of a frozen VQ the stage encodes with (read from its file, else guessed from the presets
        for the planner), or None."""
        return None

    @classmethod
    def sample_flops(cls, cfg: Any, vq_cfg: Any = None, forward: bool = True) -> dict[str, float]:
        """Per-sample FLOPs (trainer/flops.py's definition): "train" (one sample's forward + backward), "forward"
        (one forward of the trained network, 0 when `forward` is False or it has no sampling use), "tokens"
        (image tokens per sample, 0 for image stages). `vq_cfg`: `frozen_vq_config`'s, when it costs compute."""
        raise NotImplementedError(f"{cls.__name__} does not count its FLOPs")

    @classmethod
    def traced_parts(cls, cfg: Any, checkpointing: bool, batch: int) -> tuple[Any, Any]:
        """(build, step) of the trained networks at `batch` samples, with activation checkpointing on or off, for
        the planner's memory trace (trainer.flops.cuda_saved_bytes)."""
        raise NotImplementedError(f"{cls.__name__} has no traced parts")

    @classmethod
    def param_counts(cls, cfg: Any, vq_cfg: Any = None) -> tuple[int, int]:
        """(trained parameters, frozen parameters held in memory beside them), built on the meta device."""
        raise NotImplementedError(f"{cls.__name__} does not count its parameters")

    def build_models(self) -> dict[str, nn.Module]:
        """Trainable module per phase (frozen helpers live on the task itself)."""
        raise NotImplementedError

    def attach(self, engines: dict[str, Any]) -> None:
        self.engines = engines

    def inner(self, phase: str) -> nn.Module:
        """The real model of a phase (inside DeepSpeed's engine and the CastIO wrapper)."""
        return self.engines[phase].module.inner

    def loss(self, batch: dict, phase: str, step: int) -> tuple[torch.Tensor, dict[str, float]] | None:
        raise NotImplementedError

    def val_metrics(self, batch: dict, step: int) -> dict[str, torch.Tensor | float]:
        """Held-out metrics of one validation micro-batch, keys "val_<name>" ("val_loss" is the one the best
        checkpoint is chosen by), values 0-d tensors on the device (or floats). The loop (trainer/validation.py)
        calls it under torch.no_grad() with every engine in eval mode, the validated weights in place and the
        RNG streams seeded alike at every validation. Default: the first phase's `loss` metrics, renamed."""
        out = self.loss(batch, self.phases[0], step)
        return {} if out is None else {f"val_{k}": v for k, v in out[1].items()}

    @torch.no_grad()
    def sample(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def export(self, path: str, weights: dict[str, dict[str, torch.Tensor]], info: dict | None = None) -> None:
        """Write the weights-only DiVAE file. `weights` maps each of `ema_phases` to a full state dict of
        `inner(phase)` (the EMA weights, or the raw ones gathered by the loop); `info` says which (stored in
        the file's metadata, `divae.model.weights_info`). Rank 0 only, no collectives."""
        raise NotImplementedError

    def init_from(self, path: str, models: dict[str, nn.Module]) -> None:
        """Load the trainable `models` (from build_models) from a DiVAE file, before the engines exist."""
        raise NotImplementedError(f"{type(self).__name__} cannot initialise from {path}")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def images(self, batch: dict) -> torch.Tensor:
        """The batch's images on the device as (B, 3, H, W) float32 in [-1, 1]. A uint8 batch (the trainer's
        loaders, `data.images_as=uint8`) is copied as uint8 (4x fewer bytes; asynchronously from pinned
        memory) and converted on the device."""
        x = batch["image"]
        if x.dtype == torch.uint8:
            from data_pipeline.loaders import image_to_float

            return image_to_float(x.to(self.device, non_blocking=True))
        return x.to(self.device, non_blocking=True).float()


def detached(metrics: dict[str, Any]) -> dict[str, torch.Tensor | float]:
    """Per-micro-batch metrics as the loop keeps them: tensors detached on their device (no host sync),
    anything else as a Python float."""
    return {k: v.detach() if isinstance(v, torch.Tensor) else float(v) for k, v in metrics.items()}


def device_quartile_losses(t: torch.Tensor, losses: torch.Tensor, num_timesteps: int,
                           name: str) -> dict[str, torch.Tensor]:
    """Mean of `losses` (B,) per timestep quartile (quartile q holds t in [q T/4, (q+1) T/4)), as 0-d tensors on
    the device, keys "{name}_q0".."{name}_q3"; NaN for a quartile with no sample in the batch (`host_means`
    leaves it out), so that no host sync is needed to find which quartiles are present."""
    quart = (t.detach() * 4 // num_timesteps).clamp(0, 3)
    onehot = quart[None, :] == torch.arange(4, device=t.device)[:, None]  # (4, B)
    value = losses.detach().float()
    means = torch.where(onehot, value[None, :], 0.0).sum(1) / onehot.sum(1)
    return {f"{name}_q{q}": means[q] for q in range(4)}


def host_means(micro: dict[str, list[torch.Tensor | float]]) -> dict[str, float]:
    """Per-key mean over the micro-batches of a step, read to the host with one sync (one `tolist`) for all
    keys. Non-finite tensor values (a quartile absent from a micro-batch) are left out; a key with none left
    is dropped. Each value is read as float64, as `.item()` would, so the means equal the per-item ones."""
    tensors = [v.reshape(()).double() for vs in micro.values() for v in vs if isinstance(v, torch.Tensor)]
    read = iter(torch.stack(tensors).tolist()) if tensors else iter(())
    out: dict[str, float] = {}
    for k, vs in micro.items():
        vals = [next(read) if isinstance(v, torch.Tensor) else float(v) for v in vs]
        kept = [x for x in vals if math.isfinite(x)] if any(isinstance(v, torch.Tensor) for v in vs) else vals
        if kept:
            out[k] = sum(kept) / len(kept)
    return out
