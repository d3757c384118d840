"""Stage tasks: one small object per training stage (see base.py for the interface)."""

from __future__ import annotations

from trainer.tasks.base import Task
from trainer.tasks.decoder import DecoderTask
from trainer.tasks.distill import DistillTask
from trainer.tasks.prior import PriorTask
from trainer.tasks.vq import VQTask

TASKS: dict[str, type[Task]] = {"vq": VQTask, "decoder": DecoderTask, "distill": DistillTask, "prior": PriorTask}


__all__ = ["TASKS", "DecoderTask", "DistillTask", "PriorTask", "Task", "VQTask"]
