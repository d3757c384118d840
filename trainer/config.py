"""The run config: one dataclass nesting every component's own config.

    cfg = load_train_config("configs/decoder_f16.yaml", ["train.batch_size=64", "optim.lr=2e-4"])

Sections: train (this file), data (data_pipeline.loaders.DataConfig), optim and deepspeed (trainer.engine),
ema (trainer.ema), checkpoint (trainer.checkpoint), logging (trainer.metrics), vq (divae.vq.VQConfig),
vq_loss (divae.vq_loss.VQLossConfig), unet (divae.unet.UNetConfig), diffusion
(divae.diffusion.DiffusionConfig), decoder (trainer.tasks.decoder.DecoderTaskConfig), prior
(divae.prior.PriorConfig), prior_task (trainer.tasks.prior.PriorTaskConfig). A stage reads the sections it
needs and ignores the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_pipeline.loaders import DataConfig
from divae.diffusion import DiffusionConfig
from divae.prior import PriorConfig
from divae.unet import UNetConfig
from divae.utils.config import load_config
from divae.vq import VQConfig
from divae.vq_loss import VQLossConfig
from trainer.checkpoint import CheckpointConfig
from trainer.ema import EMAConfig
from trainer.engine import DeepSpeedConfig, OptimConfig
from trainer.metrics import LoggingConfig
from trainer.tasks.decoder import DecoderTaskConfig
from trainer.tasks.prior import PriorTaskConfig


@dataclass
class TrainLoopConfig:
    stage: Literal["vq", "decoder", "prior"] = "decoder"
    run_dir: str = "runs/default"  # checkpoints, samples, metrics.jsonl, config.yaml; resumes from here
    steps: int = 10_000  # optimizer steps (paper: 10k)
    batch_size: int = 256  # global images per optimizer step = micro batch x grad_accum x ranks (paper: 256)
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    seed: int = 0
    max_bad_steps: int = 5  # NaN/inf guard: stop after this many non-finite losses in a row

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.max_bad_steps < 1:
            raise ValueError("steps, batch_size, grad_accum and max_bad_steps must be >= 1")

    def micro_batch(self, world_size: int) -> int:
        """Images per rank per micro-batch; an error if the global batch does not split evenly."""
        per = world_size * self.grad_accum
        if self.batch_size % per:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by ranks x grad_accum = "
                             f"{world_size} x {self.grad_accum}; choose a multiple of {per}")
        return self.batch_size // per


@dataclass
class TrainConfig:
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    vq_loss: VQLossConfig = field(default_factory=VQLossConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    decoder: DecoderTaskConfig = field(default_factory=DecoderTaskConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    prior_task: PriorTaskConfig = field(default_factory=PriorTaskConfig)


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)
