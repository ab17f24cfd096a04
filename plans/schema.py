"""Plan schema v1: frozen dataclasses for everything the compiler decides (DESIGN section 6)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from muxtune.specs import TaskSpec

from .instructions import Instruction

SCHEMA_VERSION = 1
"""The plan schema this code reads and writes."""

PACK_ORDERS: tuple[str, ...] = ("task_then_index",)


@dataclass(frozen=True)
class JobSummary:
    """Where the plan came from: backbone, dtype, output folder, spec file (absolute paths)."""

    model: str
    dtype: str
    output_dir: str
    spec_path: str | None = None


@dataclass(frozen=True)
class ClusterPlan:
    """The device type planned for and the number of devices and ranks (processes)."""

    device: str
    num_devices: int
    num_ranks: int


@dataclass(frozen=True, kw_only=True)
class TaskPlan(TaskSpec):
    """A task's resolved hyperparameters (every `TaskSpec` field) plus its dataset stats."""

    num_examples: int
    num_targetless_examples: int
    num_tokens: int

    @classmethod
    def from_spec(cls, spec: TaskSpec, *, num_examples: int, num_targetless_examples: int, num_tokens: int) -> TaskPlan:
        """A task plan with ``spec``'s hyperparameters and the given dataset stats."""
        values = {f.name: getattr(spec, f.name) for f in dataclasses.fields(TaskSpec)}
        return cls(
            **values,
            num_examples=num_examples,
            num_targetless_examples=num_targetless_examples,
            num_tokens=num_tokens,
        )

    def to_spec(self) -> TaskSpec:
        """The plain `TaskSpec` (hyperparameters only)."""
        return TaskSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TaskSpec)})


@dataclass(frozen=True)
class HTask:
    """A fusion group: these tasks' tokens share backbone calls. ``id`` is the hTask's
    position in `Plan.htasks`.

    Each task's global batch is split, in order, into pieces of at most its entry in
    ``token_budgets`` tokens (a longer sequence forms a piece alone); micro-batch i holds
    piece i of every active task. ``micro_batch_tokens`` is the sum of the budgets.
    """

    id: int
    tasks: tuple[str, ...]
    micro_batch_tokens: int
    token_budgets: tuple[int, ...]

    def budget_of(self, name: str) -> int:
        """Task ``name``'s token budget per micro-batch."""
        return self.token_budgets[self.tasks.index(name)]


@dataclass(frozen=True)
class Alignment:
    """Micro-batch token budgets are multiples of ``chunk_size``; sequences are packed task
    by task (plan order), then by dataset index."""

    chunk_size: int
    pack_order: Literal["task_then_index"] = "task_then_index"


@dataclass(frozen=True)
class RankProgram:
    """One rank's instructions: ``prologue`` once, ``round`` until all tasks are done,
    then ``epilogue`` once."""

    rank: int
    device: str
    prologue: tuple[Instruction, ...]
    round: tuple[Instruction, ...]
    epilogue: tuple[Instruction, ...]


@dataclass(frozen=True)
class Predictions:
    """What the compiler's cost model expects (None: not estimated)."""

    num_rounds: int
    tokens_per_round: int
    est_seconds_per_round: float | None = None
    est_peak_memory_bytes: int | None = None


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A compiled job: pure data the runtime replays. Build it with keywords."""

    schema_version: int = SCHEMA_VERSION
    job: JobSummary
    fingerprint: str
    backbone: dict[str, Any]
    cluster: ClusterPlan
    tasks: tuple[TaskPlan, ...]
    htasks: tuple[HTask, ...]
    alignment: Alignment
    programs: tuple[RankProgram, ...]
    predictions: Predictions

    def task(self, name: str) -> TaskPlan:
        """The task called ``name`` (KeyError if there is none)."""
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(name)

    def htask_of(self, name: str) -> HTask:
        """The hTask that holds task ``name`` (KeyError if none does)."""
        for htask in self.htasks:
            if name in htask.tasks:
                return htask
        raise KeyError(name)
