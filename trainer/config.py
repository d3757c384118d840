"""The run config: one dataclass nesting every component's own config.

    cfg = load_train_config("configs/decoder_f16.yaml", ["train.batch_size=64", "optim.lr=2e-4"])

Sections: train (this file), data (data_pipeline.loaders.DataConfig), optim and deepspeed (trainer.engine),
ema (trainer.ema), checkpoint (trainer.checkpoint), logging (trainer.metrics), vq (divae.vq.VQConfig),
vq_loss (divae.vq_loss.VQLossConfig), vq_task (trainer.tasks.vq.VQTaskConfig), unet (divae.unet.UNetConfig),
diffusion (divae.diffusion.DiffusionConfig), decoder (trainer.tasks.decoder.DecoderTaskConfig), distill
(trainer.tasks.distill.DistillTaskConfig), prior
(divae.prior.PriorConfig), prior_task (trainer.tasks.prior.PriorTaskConfig). A stage reads the sections it
needs (`Task.config_sections`) and the saved config.yaml holds only those.

Checked across sections at load time:
- the EMA's horizon: without `ema.warmup`, an EMA with decay d averages over ~1/(1-d) optimizer steps and
  still holds d^steps of the initial weights at the end; a horizon above EMA_HORIZON_MAX_FRACTION of
  train.steps (init weight above e^-5 = 0.7%) is refused, since the export (and so every evaluation) would
  be mostly the initialisation;
- data.batch_size is derived by the trainer (train.batch_size / (ranks x grad_accum)); leave it unset (0).
  A resume keeps the checkpoint's micro-batch and recomputes grad_accum for the number of ranks it runs on
  (trainer.elastic.resume_batch; elastic resume, docs/reliability.md), so train.batch_size stays the global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_pipeline.loaders import DataConfig
from divae.diffusion import DiffusionConfig
from divae.prior import PRIOR_PRESETS, PriorConfig
from divae.unet import UNET_PRESETS, UNetConfig
from divae.utils.config import ConfigError, apply_presets, from_dict, load_config, rename_keys_deep, to_dict
from divae.vq import VQ_PRESETS, VQConfig
from divae.vq_loss import VQLossConfig
from trainer.checkpoint import CheckpointConfig
from trainer.ema import EMAConfig
from trainer.engine import DeepSpeedConfig, OptimConfig
from trainer.metrics import LoggingConfig
from trainer.tasks import TASKS
from trainer.tasks.decoder import DecoderTaskConfig
from trainer.tasks.distill import DistillTaskConfig
from trainer.tasks.prior import PriorTaskConfig
from trainer.tasks.vq import VQTaskConfig


@dataclass
class TrainLoopConfig:
    stage: str = "decoder"  # a key of trainer.tasks.TASKS (checked by load_train_config)
    run_dir: str = "runs/default"  # checkpoints, samples, metrics.jsonl, config.yaml; resumes from here
    steps: int = 10_000  # optimizer steps (paper: 10k)
    batch_size: int = 256  # global images per optimizer step = micro batch x grad_accum x ranks (paper: 256)
    grad_accum: int = 1  # micro-batches per optimizer step (at the start; a resume on other ranks recomputes it)
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
class TrainDataConfig(DataConfig):
    """The loader config of a training run: its per-rank `batch_size` is derived from train.batch_size."""

    batch_size: int = 0  # 0: train.batch_size / (ranks x grad_accum); another value must agree with that
    val_path: str = ""  # held-out shard folder for logging.val_every (trainer/validation.py); "" = no validation


EMA_HORIZON_MAX_FRACTION = 0.2


def ema_horizon(cfg: EMAConfig) -> float:
    """Optimizer steps an EMA without warm-up averages over: every / (1 - decay^every) (~1 / (1 - decay))."""
    return cfg.every / (1.0 - cfg.decay**cfg.every) if cfg.decay > 0 else float(cfg.every)


def check_ema_horizon(ema: EMAConfig, steps: int) -> None:
    """Refuse an EMA that would still be mostly the initial weights after `steps` optimizer steps."""
    if not ema.enabled or ema.warmup:
        return
    horizon = ema_horizon(ema)
    if horizon <= EMA_HORIZON_MAX_FRACTION * steps:
        return
    init_share = ema.decay**steps
    max_decay = 1.0 - 1.0 / (EMA_HORIZON_MAX_FRACTION * steps)
    raise ConfigError(
        f"ema.decay={ema.decay} averages over ~{horizon:.0f} steps, more than {EMA_HORIZON_MAX_FRACTION:.0%} of "
        f"train.steps={steps}: the exported EMA would still be {init_share:.0%} initial weights. Set ema.warmup=true "
        f"(decay ramps up as (1+n)/(10+n)), or ema.decay<={math.floor(max_decay * 1e6) / 1e6}, or ema.enabled=false")


def check_validation(cfg: TrainConfig) -> None:
    """Refuse a validation the run cannot do: logging.val_every without data.val_path, or of the EMA weights (what
    the export and best.safetensors hold) under ZeRO-3, whose partitioned weights the EMA cannot be swapped into."""
    if not cfg.logging.val_every:
        return
    if not cfg.data.val_path:
        raise ConfigError(f"logging.val_every={cfg.logging.val_every} needs data.val_path=<held-out shard folder> "
                          "(or set logging.val_every=0)")
    if cfg.deepspeed.zero_stage == 3 and cfg.ema.enabled and cfg.checkpoint.export_ema:
        raise ConfigError("logging.val_every validates the EMA weights, which cannot be swapped in under "
                          "deepspeed.zero_stage=3: use zero_stage<=2, or checkpoint.export_ema=false (validate and "
                          "export the raw weights)")


@dataclass
class TrainConfig:
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    vq_loss: VQLossConfig = field(default_factory=VQLossConfig)
    vq_task: VQTaskConfig = field(default_factory=VQTaskConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    decoder: DecoderTaskConfig = field(default_factory=DecoderTaskConfig)
    distill: DistillTaskConfig = field(default_factory=DistillTaskConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    prior_task: PriorTaskConfig = field(default_factory=PriorTaskConfig)

    def __post_init__(self) -> None:
        check_ema_horizon(self.ema, self.train.steps)
        check_validation(self)
        if self.data.batch_size < 0:
            raise ConfigError("data.batch_size must be >= 0 (0: derived from train.batch_size)")

    def per_rank_batch(self, world_size: int) -> int:
        """Images per rank per micro-batch (from train.batch_size); an error if data.batch_size disagrees."""
        micro = self.train.micro_batch(world_size)
        if self.data.batch_size not in (0, micro):
            raise ConfigError(
                f"data.batch_size={self.data.batch_size} but train.batch_size={self.train.batch_size} over "
                f"{world_size} rank(s) x {self.train.grad_accum} accumulation gives {micro} per rank: remove "
                "data.batch_size (the trainer derives it) and set train.batch_size, the global batch")
        return micro

    def sections(self, names: tuple[str, ...]) -> dict:
        """The config as a plain dict with only the sections in `names` (what a stage reads)."""
        return {k: v for k, v in to_dict(self).items() if k in names}


# The one definition of each named model size; a YAML section names one (`unet: {_preset_: decoder_f16}`) and
# states only the fields that differ (divae.utils.config).
PRESETS = {VQConfig: VQ_PRESETS, UNetConfig: UNET_PRESETS, PriorConfig: PRIOR_PRESETS}


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    return _known_stage(load_config(TrainConfig, path, overrides, presets=PRESETS))


def _known_stage(cfg: TrainConfig) -> TrainConfig:
    if cfg.train.stage not in TASKS:
        raise ConfigError(f"train.stage: {cfg.train.stage!r} is not one of {list(TASKS)}")
    return cfg


def saved_config_dict(text: str) -> dict:
    """A run folder's config.yaml (what `train` wrote at the run's start) as a dict, with the keys renamed since it
    was written mapped to their new names (`RENAMED_KEYS`), so that a run from before a rename can be inspected and
    converted."""
    return rename_keys_deep(TrainConfig, yaml.safe_load(text) or {})


def load_saved_config(path: str | Path) -> TrainConfig:
    """The TrainConfig of a run folder's config.yaml (see `saved_config_dict`)."""
    data = apply_presets(TrainConfig, saved_config_dict(Path(path).read_text()), PRESETS)
    return _known_stage(from_dict(TrainConfig, data))
