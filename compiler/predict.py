"""Predictions from the emitted plan: each phase's micro-batch loads (averaged over its rounds
from the real batches), the cost model behind the simulator's instruction costs, and the
plan's `Predictions`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from muxtune.plans import PhasePrediction, Plan, Predictions, Subgraph
from muxtune.runtime.packing import split_task_batch

from .cost.load import MicroBatchLoad, SegmentLoad
from .cost.model import CostModel
from .passes.demand import TaskDemand, mean_load, segment_load
from .passes.simulate import Loads, PhaseSimulation, simulate_plan


class PlanCosts:
    """The simulator's instruction costs for one plan: subgraphs cost their decoder layers
    (and the operators before the first or after the last layer), ranks hold their stage."""

    def __init__(self, plan: Plan, cost: CostModel) -> None:
        self.cost = cost.with_tensor_parallel(plan.placement.tensor_parallel)
        self.plan = plan
        self.num_layers = self.cost.model.num_layers
        self.task_names = tuple(t.name for t in plan.tasks)
        self.stage_of_rank = {rank: stage.id for stage in plan.placement.stages for rank in stage.ranks}

    def _span(self, subgraph: Subgraph) -> tuple[int, int, bool]:
        """Decoder layers, operators outside them, and whether the last layer is among them."""
        first, last = subgraph.first_layer, subgraph.last_layer
        layers = max(0, min(last, self.num_layers - 1) - max(first, 0) + 1)
        edges = (self.cost.model.edge_ops[0] if first < 0 else 0) + (
            self.cost.model.edge_ops[1] if last >= self.num_layers else 0
        )
        return layers, edges, layers > 0 and last >= self.num_layers - 1

    def forward_seconds(self, subgraph: Subgraph, load: MicroBatchLoad) -> float:
        layers, edges, last = self._span(subgraph)
        return self.cost.layers_seconds(layers, load, False, edges, last=last)

    def backward_seconds(self, subgraph: Subgraph, load: MicroBatchLoad) -> float:
        layers, edges, last = self._span(subgraph)
        return self.cost.layers_seconds(layers, load, True, edges, last=last)

    def loss_seconds(self, load: MicroBatchLoad) -> float:
        return self.cost.loss_seconds(load)

    def transfer_seconds(self, load: MicroBatchLoad) -> float:
        return self.cost.transfer_seconds(load)

    def all_reduce_seconds(self, tasks: Sequence[str], group_size: int) -> float:
        return self.cost.all_reduce_seconds(tasks, group_size)

    def optimizer_seconds(self, tasks: Sequence[str]) -> float:
        return self.cost.optimizer_seconds(tasks)

    def load_batches_seconds(self, loads: Sequence[MicroBatchLoad]) -> float:
        return self.cost.load_batches_seconds(loads)

    def concurrent_slowdown(self, streams: int) -> float:
        return self.cost.concurrent_slowdown(streams)

    def activation_bytes(self, subgraph: Subgraph, load: MicroBatchLoad) -> int:
        return self.cost.layers_activation_bytes(self._span(subgraph)[0], load)

    def loss_activation_bytes(self, load: MicroBatchLoad) -> int:
        return self.cost.loss_activation_bytes(load)

    def boundary_bytes(self, load: MicroBatchLoad) -> int:
        return self.cost.boundary_bytes(load)

    def static_bytes(self, rank: int) -> int:
        stage = self.plan.placement.stages[self.stage_of_rank[rank]]
        first = stage.id == 0
        last = stage.id == len(self.plan.placement.stages) - 1
        return self.cost.static_bytes(stage.last_layer - stage.first_layer + 1, first, last, self.task_names)


def phase_loads(plan: Plan, phase_index: int, demands: Mapping[str, TaskDemand]) -> Loads:
    """Each (hTask, micro-batch) of the phase: per task, the mean over the phase's rounds of
    the piece it carries there (data-parallel replica 0's share)."""
    phase = plan.phases[phase_index]
    dp = plan.placement.data_parallel
    loads: dict[tuple[int, int], MicroBatchLoad] = {}
    for htask in phase.htasks:
        pieces = {
            name: [split_task_batch(list(batch), htask.budget_of(name)) for batch in demands[name].batches]
            for name in htask.tasks
        }
        for mb in range(htask.num_microbatches):
            load: dict[str, SegmentLoad] = {}
            for name in htask.tasks:
                per_round = [segment_load(p[mb * dp]) if mb * dp < len(p) else segment_load([]) for p in pieces[name]]
                load[name] = mean_load(per_round)
            loads[htask.id, mb] = load
    return loads


def predictions(
    plan: Plan,
    demands_by_phase: Sequence[Mapping[str, TaskDemand]],
    cost: CostModel,
    ineffective: Mapping[str, float],
) -> tuple[Predictions, tuple[PhaseSimulation, ...]]:
    """Simulate every phase; ``ineffective`` is each task's share of laid-out tokens that are
    not its own (prompt tuning's placeholders)."""
    loads = [phase_loads(plan, i, demands) for i, demands in enumerate(demands_by_phase)]
    simulations = simulate_plan(plan, loads, PlanCosts(plan, cost))
    phases = []
    total_seconds = total_tokens = 0.0
    for phase, sim, demands in zip(plan.phases, simulations, demands_by_phase):
        tokens = sum(d.round_load.tokens for d in demands.values())
        wasted = sum(d.round_load.tokens * ineffective.get(name, 0.0) for name, d in demands.items())
        seconds = sim.seconds_per_round
        phases.append(
            PhasePrediction(
                phase=phase.id,
                seconds_per_round=round(seconds, 6),
                tokens_per_round=round(tokens),
                tokens_per_second=round(tokens / seconds, 3) if seconds > 0 else 0.0,
                bubble_fraction=round(sim.bubble_fraction, 6),
                exposed_communication_seconds=round(sim.exposed_communication_seconds, 6),
                peak_memory_bytes=sim.peak_memory_bytes,
                ineffective_token_ratio=round(wasted / tokens, 6) if tokens else 0.0,
            )
        )
        total_seconds += seconds * phase.num_rounds
        total_tokens += tokens * phase.num_rounds
    num_rounds = plan.num_rounds
    return (
        Predictions(
            num_rounds=num_rounds,
            tokens_per_round=round(total_tokens / num_rounds) if num_rounds else 0,
            est_seconds_per_round=round(total_seconds / num_rounds, 6) if num_rounds else None,
            est_peak_memory_bytes=max(max(p.peak_memory_bytes) for p in phases),
            est_total_seconds=round(total_seconds, 6),
            est_tokens_per_second=round(total_tokens / total_seconds, 3) if total_seconds > 0 else None,
            phases=tuple(phases),
        ),
        simulations,
    )
