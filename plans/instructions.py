"""The closed instruction set of a rank program: one opcode, one small typed payload.

A rank program has a prologue (run once), a round body and an epilogue (run once). The round
body is replayed until every task has taken all its optimizer steps; in one round every task
that still has steps left consumes one global batch (``batch_size`` sequences) and steps once.
Tasks that have finished are inactive and skipped by every instruction.
In YAML an instruction is a flat mapping: ``{op: forward_backward, htask: 0}``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Union


class Opcode(str, enum.Enum):
    """Every operation a plan may contain; adding one is a schema change."""

    LOAD_BACKBONE = "load_backbone"
    BUILD_TASKS = "build_tasks"
    FORWARD_BACKWARD = "forward_backward"
    OPTIMIZER_STEP = "optimizer_step"
    CHECKPOINT = "checkpoint"
    EXPORT_ADAPTERS = "export_adapters"


@dataclass(frozen=True)
class LoadBackbone:
    """Load the frozen backbone (the plan's model, in the plan's dtype) onto this rank's device."""

    op: ClassVar[Opcode] = Opcode.LOAD_BACKBONE


@dataclass(frozen=True)
class BuildTasks:
    """Create these tasks' PEFT modules (from ``init_from`` when set), optimizers, LR
    schedules and data streams."""

    op: ClassVar[Opcode] = Opcode.BUILD_TASKS
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class ForwardBackward:
    """Pack this hTask's active tasks' next global batches into micro-batches of at most
    the hTask's ``micro_batch_tokens`` and run forward and backward on each."""

    op: ClassVar[Opcode] = Opcode.FORWARD_BACKWARD
    htask: int


@dataclass(frozen=True)
class OptimizerStep:
    """For each listed active task: clip its gradients, step its optimizer and LR schedule,
    zero its gradients, and count the step (a task is done once it has taken ``steps``)."""

    op: ClassVar[Opcode] = Opcode.OPTIMIZER_STEP
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class Checkpoint:
    """Checkpoint every task whose step count reached a multiple of its ``save_every``."""

    op: ClassVar[Opcode] = Opcode.CHECKPOINT


@dataclass(frozen=True)
class ExportAdapters:
    """Write every task's adapter (PEFT format) and run summary to ``output_dir/<task>/``."""

    op: ClassVar[Opcode] = Opcode.EXPORT_ADAPTERS


Instruction = Union[LoadBackbone, BuildTasks, ForwardBackward, OptimizerStep, Checkpoint, ExportAdapters]

INSTRUCTION_TYPES: dict[Opcode, type] = {
    cls.op: cls for cls in (LoadBackbone, BuildTasks, ForwardBackward, OptimizerStep, Checkpoint, ExportAdapters)
}
assert set(INSTRUCTION_TYPES) == set(Opcode), "every opcode needs exactly one payload type"


@functools.cache
def payload_fields(cls: type) -> dict[str, Any]:
    """Payload field name -> resolved type (``int`` or ``tuple[str, ...]``) of an instruction."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def instruction_to_dict(instruction: Instruction) -> dict[str, Any]:
    """The YAML form: ``op`` first, then the payload fields in declaration order."""
    out: dict[str, Any] = {"op": instruction.op.value}
    for field in dataclasses.fields(instruction):
        value = getattr(instruction, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out
