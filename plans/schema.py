"""Plan schema 2: frozen dataclasses for everything the compiler decides (DESIGN section 6).

A plan is a complete, static program: the placement of layers on ranks, the subgraph
partition each rank rebuilds, the phases (runs of rounds with a constant set of active tasks),
each phase's hTasks with their exact number of micro-batches per round, and per rank one
instruction list per phase."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from muxtune.specs import TaskSpec

from .instructions import Instruction
from .predictions import Predictions, SolverReport

SCHEMA_VERSION = 2
"""The plan schema this code reads and writes."""

PACK_ORDERS: tuple[str, ...] = ("task_then_index",)


@dataclass(frozen=True)
class JobSummary:
    """Where the plan came from: backbone, dtype, output folder, spec file (absolute paths), and
    the integrations that also get each task's step metrics (``report_to``; empty for none)."""

    model: str
    dtype: str
    output_dir: str
    spec_path: str | None = None
    report_to: tuple[str, ...] = ()


SUBGRAPH_KINDS: tuple[str, ...] = ("backbone", "peft", "collective")


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: decoder layers ``first_layer..last_layer`` on ``ranks`` (the stage's
    tensor-parallel group, one rank per shard). The first stage also holds the embeddings, the
    last one the final norm and the head."""

    id: int
    ranks: tuple[int, ...]
    first_layer: int
    last_layer: int


@dataclass(frozen=True)
class Placement:
    """The device mesh: ranks = pipeline x tensor x data parallel degrees."""

    device: str
    num_devices: int
    num_ranks: int
    pipeline_parallel: int
    tensor_parallel: int
    data_parallel: int
    stages: tuple[Stage, ...]


@dataclass(frozen=True)
class Subgraph:
    """One part of the traced backbone (+ PEFT hosts) graph: its kind, the stage that runs it,
    the decoder layers it covers (``-1`` for the embeddings before layer 0 and ``num_layers``
    for what follows the last), its graph nodes ``first_node..last_node`` (``num_nodes`` in
    graph order; ``digest`` hashes their names, ops, targets and arguments, so a rank rebuilding
    the partition on its own model can check it got the same subgraph), and the names of the
    values it reads and of those it writes for later subgraphs or the graph's output."""

    id: int
    kind: str
    stage: int
    first_layer: int
    last_layer: int
    first_node: str
    last_node: str
    num_nodes: int
    digest: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Partition:
    """The subgraphs in execution order, the graph's inputs (placeholders, given by each
    micro-batch) and outputs, and the policy that cut them (for the record)."""

    policy: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    subgraphs: tuple[Subgraph, ...]


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
    """A fusion group of one phase: these tasks' tokens share backbone calls. ``id`` is the
    hTask's position in its phase.

    Each task's global batch is split, in order, into pieces of at most its entry in
    ``token_budgets`` tokens (a longer sequence forms a piece alone); micro-batch i holds
    piece i of every task. ``micro_batch_tokens`` is the sum of the budgets; every round of the
    phase has exactly ``num_microbatches`` micro-batches (some task pieces may be empty).
    """

    id: int
    tasks: tuple[str, ...]
    micro_batch_tokens: int
    token_budgets: tuple[int, ...]
    num_microbatches: int

    def budget_of(self, name: str) -> int:
        """Task ``name``'s token budget per micro-batch."""
        return self.token_budgets[self.tasks.index(name)]


@dataclass(frozen=True)
class Phase:
    """Rounds ``first_round..first_round + num_rounds - 1`` (1-based, global), in which exactly
    ``tasks`` are active: each takes one optimizer step per round.

    A rank's round body covers ``rounds_per_body`` consecutive rounds (``num_rounds`` is a
    multiple): the body is replayed once per that many rounds, and every task steps once per
    round inside it. Its instructions name hTask instances: instance ``h + j * len(htasks)`` is
    hTask ``h`` in the body's round ``j`` (with one round per body, instances are hTask ids).
    Several rounds per body let CPU lanes run one hTask's next round while another lane still
    runs this one, instead of meeting at every round's end."""

    id: int
    first_round: int
    num_rounds: int
    tasks: tuple[str, ...]
    htasks: tuple[HTask, ...]
    rounds_per_body: int = 1

    @property
    def last_round(self) -> int:
        return self.first_round + self.num_rounds - 1

    @property
    def num_instances(self) -> int:
        """hTask instances a round body names (`rounds_per_body` rounds of every hTask)."""
        return len(self.htasks) * self.rounds_per_body

    def htask_of_instance(self, instance: int) -> HTask:
        """The hTask an instance of a round body runs."""
        return self.htasks[instance % len(self.htasks)]

    def ends_body(self, round_index: int) -> bool:
        """Whether round ``round_index`` of this phase is the last of a round body (the rounds a
        checkpoint, or the round a run resumes after, may be)."""
        return (round_index - self.first_round + 1) % self.rounds_per_body == 0

    def round_of_instance(self, instance: int) -> int:
        """The round of the body (0-based) an instance runs in."""
        return instance // len(self.htasks)

    def htask_of(self, name: str) -> HTask:
        """The hTask of this phase that holds task ``name`` (KeyError if none does)."""
        for htask in self.htasks:
            if name in htask.tasks:
                return htask
        raise KeyError(name)


@dataclass(frozen=True)
class Alignment:
    """Micro-batch token budgets are multiples of ``chunk_size``; sequences are packed task
    by task (plan order), then by dataset index."""

    chunk_size: int
    pack_order: Literal["task_then_index"] = "task_then_index"


@dataclass(frozen=True)
class RankProgram:
    """One rank's instructions: ``prologue`` once, then for each phase its round body once per
    round of the phase (``phases[i]`` belongs to `Plan.phases[i]`), then ``epilogue`` once."""

    rank: int
    device: str
    stage: int
    prologue: tuple[Instruction, ...]
    phases: tuple[tuple[Instruction, ...], ...]
    epilogue: tuple[Instruction, ...]


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A compiled job: pure data the runtime replays. Build it with keywords."""

    schema_version: int = SCHEMA_VERSION
    job: JobSummary
    fingerprint: str
    backbone: dict[str, Any]
    placement: Placement
    partition: Partition
    tasks: tuple[TaskPlan, ...]
    alignment: Alignment
    phases: tuple[Phase, ...]
    programs: tuple[RankProgram, ...]
    predictions: Predictions
    solver: tuple[SolverReport, ...] = ()

    def task(self, name: str) -> TaskPlan:
        """The task called ``name`` (KeyError if there is none)."""
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(name)

    @property
    def num_rounds(self) -> int:
        """Rounds of the whole job (the last phase's last round)."""
        return self.phases[-1].last_round if self.phases else 0
