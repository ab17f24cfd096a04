"""A task's side of a run: its engine configuration, batch stream, logs and figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from muxtune.common.memory import peak_resident_bytes
from muxtune.plans import TaskPlan

from .data import Example
from .engine import TaskTraining
from .run_logs import StepLog


def task_training(task: TaskPlan) -> TaskTraining:
    """The engine's view of a planned task."""
    return TaskTraining(
        name=task.name,
        peft=task.peft,
        lr=task.lr,
        steps=task.steps,
        weight_decay=task.weight_decay,
        max_grad_norm=task.max_grad_norm,
        schedule=task.schedule.name,
        warmup_steps=task.schedule.warmup_steps,
        seed=task.seed,
    )


@dataclass
class TaskRun:
    """A task's data stream and files during a run."""

    plan: TaskPlan
    directory: Path
    examples: tuple[Example, ...]
    batches: Iterator[list[int]]
    metrics: StepLog
    manifest: StepLog
    current_batch: list[Example] = field(default_factory=list)
    last_step_time: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    tokens: int = 0  # over the whole run, resumed parts included
    tokens_this_process: int = 0  # what throughput is measured on
    diverged_at: int | None = None
    checkpoint: Path | None = None


def peak_memory_bytes() -> int:
    """Peak device memory on CUDA, else the process's peak resident set size (`peak_resident_bytes`)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return peak_resident_bytes()
