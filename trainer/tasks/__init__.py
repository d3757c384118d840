"""Stage tasks: one small object per training stage (see base.py for the interface)."""

from __future__ import annotations

from trainer.tasks.base import Task
from trainer.tasks.decoder import DecoderTask
from trainer.tasks.prior import PriorTask
from trainer.tasks.vq import VQTask

TASKS: dict[str, type[Task]] = {"vq": VQTask, "decoder": DecoderTask, "prior": PriorTask}


def register_task(name: str, cls: type[Task]) -> None:
    TASKS[name] = cls


__all__ = ["TASKS", "DecoderTask", "PriorTask", "Task", "VQTask", "register_task"]
