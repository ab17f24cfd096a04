"""The closed instruction set of a rank program (plan schema 2): one opcode, one typed payload.

A rank program has a prologue (run once), one round body per phase (run once per round of that
phase) and an epilogue (run once). Everything is static: which hTasks run, how many
micro-batches each has, in which order subgraphs run forward and backward, when checkpoints are
taken. The runtime only replays it.

Buffers are named by what produces them: the value ``v`` of micro-batch ``m`` of hTask ``h``
is written by the forward of the subgraph that outputs ``v`` and read by the subgraphs that take
it as an input; its gradient is written by the backwards of those readers. `LossBackward` turns
the last subgraph's output into its gradient. `Free` releases a micro-batch's buffers. Work is
issued on numbered streams (CUDA streams on GPU, one sequential stream on CPU) and ordered
across streams by events. In YAML an instruction is a flat mapping:
``{op: forward, htask: 0, microbatch: 1, subgraph: 2, stream: 0}``.
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
    LOAD_BATCHES = "load_batches"
    FORWARD = "forward"
    LOSS_BACKWARD = "loss_backward"
    BACKWARD = "backward"
    FREE = "free"
    SEND = "send"
    RECV = "recv"
    RECORD_EVENT = "record_event"
    WAIT_EVENT = "wait_event"
    ALL_REDUCE = "all_reduce"
    OPTIMIZER_STEP = "optimizer_step"
    CHECKPOINT = "checkpoint"
    EXPORT_ADAPTERS = "export_adapters"


@dataclass(frozen=True)
class LoadBackbone:
    """Load this rank's stage of the frozen backbone (the plan's model and dtype); once every
    task is built, the rank rebuilds the plan's subgraph partition on it."""

    op: ClassVar[Opcode] = Opcode.LOAD_BACKBONE
    stage: int


@dataclass(frozen=True)
class BuildTasks:
    """Create these tasks' PEFT modules (from ``init_from`` when set), optimizers, LR
    schedules and batch streams."""

    op: ClassVar[Opcode] = Opcode.BUILD_TASKS
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class LoadBatches:
    """Draw the next global batch of every task of the hTask and lay it out as the phase's
    ``num_microbatches`` micro-batches (piece i of every task in micro-batch i)."""

    op: ClassVar[Opcode] = Opcode.LOAD_BATCHES
    htask: int
    stream: int


@dataclass(frozen=True)
class Forward:
    """Run ``subgraph`` forward on micro-batch ``microbatch`` of ``htask``."""

    op: ClassVar[Opcode] = Opcode.FORWARD
    htask: int
    microbatch: int
    subgraph: int
    stream: int


@dataclass(frozen=True)
class LossBackward:
    """Each task's loss on its segment of the micro-batch (head + NLL over its target tokens,
    divided by the task's target tokens in its whole global batch), and the gradient of the
    last subgraph's output."""

    op: ClassVar[Opcode] = Opcode.LOSS_BACKWARD
    htask: int
    microbatch: int
    stream: int


@dataclass(frozen=True)
class Backward:
    """Back-propagate ``subgraph`` for the micro-batch: the gradients of its outputs to the
    gradients of its inputs, accumulating the PEFT parameters' gradients."""

    op: ClassVar[Opcode] = Opcode.BACKWARD
    htask: int
    microbatch: int
    subgraph: int
    stream: int


@dataclass(frozen=True)
class Free:
    """Release every buffer of the micro-batch."""

    op: ClassVar[Opcode] = Opcode.FREE
    htask: int
    microbatch: int
    stream: int


@dataclass(frozen=True)
class Send:
    """Send the micro-batch's activation (``grad: false``) or gradient (``grad: true``) at the
    boundary after ``subgraph`` to rank ``peer``."""

    op: ClassVar[Opcode] = Opcode.SEND
    htask: int
    microbatch: int
    subgraph: int
    grad: bool
    peer: int


@dataclass(frozen=True)
class Recv:
    """Receive what the matching `Send` of rank ``peer`` sends."""

    op: ClassVar[Opcode] = Opcode.RECV
    htask: int
    microbatch: int
    subgraph: int
    grad: bool
    peer: int


@dataclass(frozen=True)
class RecordEvent:
    """Mark the point ``stream`` has reached as ``event``."""

    op: ClassVar[Opcode] = Opcode.RECORD_EVENT
    event: str
    stream: int


@dataclass(frozen=True)
class WaitEvent:
    """Make ``stream`` wait until ``event`` (recorded earlier in the program) has happened."""

    op: ClassVar[Opcode] = Opcode.WAIT_EVENT
    event: str
    stream: int


@dataclass(frozen=True)
class AllReduce:
    """Sum the tasks' gradients over the ranks of ``group`` (data-parallel replicas)."""

    op: ClassVar[Opcode] = Opcode.ALL_REDUCE
    tasks: tuple[str, ...]
    group: tuple[int, ...]


@dataclass(frozen=True)
class OptimizerStep:
    """For each listed task: clip its gradients, step its optimizer and LR schedule, zero its
    gradients and count the step. On stream 0 after every stream is joined, or (in a body of
    several rounds) on the stream of the tasks' hTask, right after its micro-batches."""

    op: ClassVar[Opcode] = Opcode.OPTIMIZER_STEP
    tasks: tuple[str, ...]
    stream: int = 0


@dataclass(frozen=True)
class Checkpoint:
    """Checkpoint every task in these rounds (global round numbers of the phase)."""

    op: ClassVar[Opcode] = Opcode.CHECKPOINT
    rounds: tuple[int, ...]


@dataclass(frozen=True)
class ExportAdapters:
    """Write every finished task's adapter (PEFT format) to ``output_dir/<task>/``."""

    op: ClassVar[Opcode] = Opcode.EXPORT_ADAPTERS


Instruction = Union[
    LoadBackbone,
    BuildTasks,
    LoadBatches,
    Forward,
    LossBackward,
    Backward,
    Free,
    Send,
    Recv,
    RecordEvent,
    WaitEvent,
    AllReduce,
    OptimizerStep,
    Checkpoint,
    ExportAdapters,
]

INSTRUCTION_TYPES: dict[Opcode, type] = {cls.op: cls for cls in typing.get_args(Instruction)}
assert set(INSTRUCTION_TYPES) == set(Opcode), "every opcode needs exactly one payload type"

MICROBATCH_OPS = (Forward, LossBackward, Backward, Free, Send, Recv)
"""Instructions that act on one micro-batch of one hTask."""


@functools.cache
def payload_fields(cls: type) -> dict[str, Any]:
    """Payload field name -> resolved type (``int``, ``bool``, ``str`` or a tuple type)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def instruction_to_dict(instruction: Instruction) -> dict[str, Any]:
    """The YAML form: ``op`` first, then the payload fields in declaration order (a field left
    at its default, such as an optimizer step's stream 0, is not written)."""
    out: dict[str, Any] = {"op": instruction.op.value}
    for field in dataclasses.fields(instruction):
        value = getattr(instruction, field.name)
        if field.default is not dataclasses.MISSING and value == field.default:
            continue
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out
