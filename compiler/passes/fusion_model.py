"""The solver's view of one phase: integer costs (picoseconds, bytes) of every choice, and the
exact evaluation of one decision that the CP-SAT model encodes, the greedy fallback searches
and the brute-force check enumerates.

A decision is: a placement option (stages' layer counts, tensor and data-parallel degrees),
a split of the tasks into hTasks, per hTask a number of micro-batches m (every task of the
hTask splits its share of a round into m pieces), and which hTask runs first and which last.
The round time on stage s is the sum over hTasks of m times one micro-batch's forward and
backward there; the round takes the busiest stage's work, plus the pipeline's fill (the first
micro-batch's forward through every stage but the last) and drain (the last micro-batch's
backward back through every stage but the first) with their transfers, plus per-round
constants (batch loading, all-reduces, optimizer steps). Memory on stage s holds its static
bytes and, for the worst micro-batch of any hTask, S - s micro-batches' activations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..cost.devices import planning_bytes
from ..cost.load import SegmentLoad
from ..cost.model import CostModel
from .demand import TaskDemand

PS = 1e12
"""Picoseconds per second: the solver's integer time unit."""
RULED_OUT = 1 << 40
"""Memory (bytes) standing for a choice that is not allowed: more than any device holds."""


@dataclass(frozen=True)
class PlacementOption:
    """Layers per pipeline stage, tensor- and data-parallel degrees."""

    stage_layers: tuple[int, ...]
    tensor_parallel: int
    data_parallel: int

    @property
    def num_stages(self) -> int:
        return len(self.stage_layers)

    @property
    def num_ranks(self) -> int:
        return self.num_stages * self.tensor_parallel * self.data_parallel


@dataclass(frozen=True)
class StageTerms:
    """One stage's shared micro-batch costs (picoseconds): a fixed part, the GEMMs' max of a
    per-token and a weight-bound part, and a per-token rest, forward and backward."""

    fixed: tuple[int, int]
    gemm_per_token: tuple[int, int]
    weight: tuple[int, int]
    per_token: tuple[int, int]


@dataclass(frozen=True)
class PlacementCosts:
    """Everything the solver needs for one placement option: per stage its shared terms, its
    static bytes (weights, runtime, adapter state) and memory head-room, and per (task, m) the
    task's tokens in one micro-batch, its own time on each stage (forward, backward incl. loss)
    and its activation bytes on each stage; the transfer terms and the per-round constant."""

    option: PlacementOption
    stages: tuple[StageTerms, ...]
    static: tuple[int, ...]
    headroom: tuple[int, ...]
    tokens: dict[tuple[int, int], int]
    own_time: dict[tuple[int, int], tuple[tuple[int, int], ...]]
    memory: dict[tuple[int, int], tuple[int, ...]]
    transfer_fixed: int
    transfer_per_token: int
    constant: int


@dataclass(frozen=True)
class FusionProblem:
    """One phase's tasks (in plan order), the micro-batch counts to choose from, how many
    hTasks at most, and the placement options with their costs."""

    tasks: tuple[str, ...]
    microbatch_choices: tuple[int, ...]
    max_htasks: int
    placements: tuple[PlacementCosts, ...]


@dataclass(frozen=True)
class Decision:
    """A solution: placement index, hTasks (task indices, each sorted, hTasks in canonical
    order), m per hTask, and the positions of the first and last hTask."""

    placement: int
    groups: tuple[tuple[int, ...], ...]
    microbatches: tuple[int, ...]
    first: int
    last: int


def _ps(seconds: float) -> int:
    return round(seconds * PS)


def placement_costs(
    cost: CostModel,
    option: PlacementOption,
    demands: Sequence[TaskDemand],
    choices: Sequence[int],
    memory_limit: int,
    all_tasks: Sequence[str],
    budget_caps: Mapping[str, int] | None = None,
) -> PlacementCosts:
    """Integer costs of ``option`` for these tasks; ``all_tasks`` (every task of the job) hold
    adapter state on every rank. A task's micro-batch counts whose budget exceeds its entry in
    ``budget_caps`` are ruled out (as if they did not fit in memory)."""
    shard = cost.with_tensor_parallel(option.tensor_parallel)
    num_stages = option.num_stages
    stages, static_bytes, headroom = [], [], []
    usable = planning_bytes(memory_limit)
    for s, layers in enumerate(option.stage_layers):
        first, last = s == 0, s == num_stages - 1
        edges = (shard.model.edge_ops[0] if first else 0) + (shard.model.edge_ops[1] if last else 0)
        terms = [shard.layer_terms(backward) for backward in (False, True)]
        edge = [shard.layers_seconds(0, {}, backward, edges) for backward in (False, True)]
        if last:
            edge[1] += shard.head_read_seconds()
        stages.append(
            StageTerms(
                fixed=tuple(_ps(layers * t.fixed + e) for t, e in zip(terms, edge)),
                gemm_per_token=tuple(_ps(layers * t.gemm_seconds_per_token) for t in terms),
                weight=tuple(_ps(layers * t.weight_seconds) for t in terms),
                per_token=tuple(_ps(layers * t.seconds_per_token) for t in terms),
            )
        )
        static = shard.static_bytes(layers, first, last, all_tasks)
        static_bytes.append(static)
        headroom.append(usable - static)
    tokens, own_time, memory = {}, {}, {}
    dp = option.data_parallel
    caps = budget_caps or {}
    for i, demand in enumerate(demands):
        for m in choices:
            piece = demand.piece_load(m * dp)
            budget = demand.budget_for(m * dp)
            worst = piece.scaled(budget / piece.tokens) if piece.tokens else piece
            tokens[i, m] = max(1, round(piece.tokens))
            own, mem = [], []
            for s, layers in enumerate(option.stage_layers):
                last = s == num_stages - 1
                forward = layers * shard.task_layer_seconds(demand.name, piece, False)
                backward = layers * shard.task_layer_seconds(demand.name, piece, True)
                if last:
                    backward += shard.task_loss_seconds(demand.name, piece)
                own.append((_ps(forward), _ps(backward)))
                held = shard.layers_activation_bytes(layers, {demand.name: worst}) * (num_stages - s)
                if last:
                    held += shard.loss_activation_bytes({demand.name: worst})
                if s > 0:
                    held += shard.boundary_bytes({demand.name: worst}) * (num_stages - s)
                mem.append(held if budget <= caps.get(demand.name, budget) else RULED_OUT)
            own_time[i, m] = tuple(own)
            memory[i, m] = tuple(mem)
    names = [d.name for d in demands]
    rounds = [{d.name: d.round_load.scaled(1.0 / dp)} for d in demands]
    constant = shard.load_batches_seconds(rounds) + shard.optimizer_seconds(names)
    constant += shard.all_reduce_seconds(names, dp)
    unit = {"_": SegmentLoad(1.0, 0.0, 0.0, 0.0)}
    return PlacementCosts(
        option=option,
        stages=tuple(stages),
        static=tuple(static_bytes),
        headroom=tuple(headroom),
        tokens=tokens,
        own_time=own_time,
        memory=memory,
        transfer_fixed=_ps(shard.device.link_latency_seconds) if num_stages > 1 else 0,
        transfer_per_token=_ps(shard.boundary_bytes(unit) / shard.device.link_bandwidth) if num_stages > 1 else 0,
        constant=_ps(constant),
    )


def microbatch_time(costs: PlacementCosts, stage: int, group: Sequence[int], m: int, backward: bool) -> int:
    """One micro-batch of the hTask ``group`` with ``m`` micro-batches on ``stage`` (ps)."""
    terms = costs.stages[stage]
    n = sum(costs.tokens[i, m] for i in group)
    shared = terms.fixed[backward] + max(terms.gemm_per_token[backward] * n, terms.weight[backward])
    shared += terms.per_token[backward] * n
    return shared + sum(costs.own_time[i, m][stage][backward] for i in group)


def fits(costs: PlacementCosts, group: Sequence[int], m: int) -> bool:
    """Whether the hTask's worst micro-batch fits every stage's memory head-room."""
    return all(sum(costs.memory[i, m][s] for i in group) <= room for s, room in enumerate(costs.headroom))


def peak_bytes(costs: PlacementCosts, groups: Sequence[Sequence[int]], ms: Sequence[int]) -> int:
    """The fullest stage's memory: its static bytes and the largest hTask's worst micro-batches
    (one hTask's activations are alive at a time)."""
    return max(
        static + max(sum(costs.memory[i, m][s] for i in g) for g, m in zip(groups, ms))
        for s, static in enumerate(costs.static)
    )


def steady_time(costs: PlacementCosts, groups: Sequence[Sequence[int]], ms: Sequence[int]) -> int:
    """The round's busiest stage (every hTask's micro-batches, forward and backward) plus the
    per-round constant (ps): the round time without the pipeline's fill and drain."""
    work = [
        sum(
            m * (microbatch_time(costs, s, g, m, False) + microbatch_time(costs, s, g, m, True))
            for g, m in zip(groups, ms)
        )
        for s in range(costs.option.num_stages)
    ]
    return max(work) + costs.constant


def end_time(costs: PlacementCosts, group: Sequence[int], m: int, backward: bool) -> int:
    """The pipeline's fill (forward) or drain (backward) when hTask ``group`` opens or closes
    the round: its micro-batch through every other stage plus the transfers (ps)."""
    num_stages = costs.option.num_stages
    if num_stages == 1:
        return 0
    stages = range(1, num_stages) if backward else range(num_stages - 1)
    n = sum(costs.tokens[i, m] for i in group)
    total = sum(microbatch_time(costs, s, group, m, backward) for s in stages)
    return total + (num_stages - 1) * (costs.transfer_fixed + costs.transfer_per_token * n)


def evaluate(problem: FusionProblem, decision: Decision) -> int | None:
    """The round time (ps) of ``decision``, or None when it breaks a memory limit."""
    costs = problem.placements[decision.placement]
    groups, ms = decision.groups, decision.microbatches
    if any(not fits(costs, g, m) for g, m in zip(groups, ms)):
        return None
    total = steady_time(costs, groups, ms)
    if costs.option.num_stages > 1:
        total += end_time(costs, groups[decision.first], ms[decision.first], False)
        total += end_time(costs, groups[decision.last], ms[decision.last], True)
    return total
