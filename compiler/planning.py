"""The planner: placement options for the declared cluster, one fusion problem per phase, the
solver's (or a fixed) decision, and the phases it becomes.

The placement is chosen on the first phase (every task active) and kept: a rank loads its
layers once. Each later phase, when tasks have finished, is re-fused for the tasks that remain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from muxtune.plans import Phase, SolverReport, TaskPlan
from muxtune.runtime.data import TokenizedDataset
from muxtune.specs import ClusterSpec

from .cost.devices import GIB, MEMORY_RESERVE, planning_bytes
from .cost.model import CostModel
from .errors import CompileError
from .passes.align import active_sets, fused_phase
from .passes.demand import TaskDemand, global_batches
from .passes.fusion_model import Decision, FusionProblem, PlacementOption, evaluate, fits, placement_costs
from .passes.solve import best_counts, seconds, solve

MICROBATCH_CHOICES = (1, 2, 3, 4, 6, 8, 12, 16)
MAX_HTASKS = 4
SOLVE_BUDGET = 1.2
"""CP-SAT's deterministic time for the whole job, shared by the phases in proportion to their
rounds (what they weigh in the job's time); small phases usually finish well inside theirs."""
FUSION_MODES = ("solve", "fuse", "no_fuse")


@dataclass(frozen=True)
class PhasePlan:
    """One phase as decided: its plan data, the demands it was decided on, and the report."""

    phase: Phase
    demands: dict[str, TaskDemand]
    report: SolverReport


@dataclass(frozen=True)
class JobPlan:
    """The chosen placement option and every phase."""

    option: PlacementOption
    phases: tuple[PhasePlan, ...]


def _divisors(value: int) -> list[int]:
    return [d for d in range(1, value + 1) if value % d == 0]


def stage_splits(cost: CostModel, num_stages: int) -> list[tuple[int, ...]]:
    """Candidate layer counts per stage: the last stage (with the head) gets fewer layers so
    stages take equal time per token; for two stages, that split and its neighbours."""
    layers = cost.model.num_layers
    if num_stages == 1:
        return [(layers,)]
    per_layer = 4 * cost.model.layer_matmul_params
    head = 4 * cost.model.head_params * 0.5
    ideal = (layers * per_layer + head) / num_stages
    last = min(max(1, round((ideal - head) / per_layer)), layers - num_stages + 1)
    candidates = [last - 1, last, last + 1] if num_stages == 2 else [last]
    splits = []
    for tail in candidates:
        rest = layers - tail
        if tail < 1 or rest < num_stages - 1:
            continue
        base, extra = divmod(rest, num_stages - 1)
        splits.append(tuple([base + (1 if s < extra else 0) for s in range(num_stages - 1)] + [tail]))
    return splits


def placement_options(cluster: ClusterSpec, cost: CostModel, *, splittable: bool = True) -> list[PlacementOption]:
    """Every (pipeline, tensor, data) degree whose product is the device count, honouring the
    spec's fixed degrees; tensor parallelism must divide heads and widths, and is 1 unless the
    job is ``splittable`` (see `tensor_parallel.tensor_parallel_problems`)."""
    m = cost.model
    options = []
    for pp in _divisors(cluster.num_devices):
        if pp > m.num_layers or (cluster.pipeline_parallel != "auto" and pp != cluster.pipeline_parallel):
            continue
        for tp in _divisors(cluster.num_devices // pp):
            if (cluster.tensor_parallel != "auto" and tp != cluster.tensor_parallel) or (tp > 1 and not splittable):
                continue
            if any(width % tp for width in (m.num_heads, m.num_kv_heads, m.intermediate, m.hidden)):
                continue
            dp = cluster.num_devices // (pp * tp)
            options += [PlacementOption(split, tp, dp) for split in stage_splits(cost, pp)]
    if not options:
        raise CompileError(
            [
                f"cluster: no placement of {cluster.num_devices} devices with pipeline_parallel="
                f"{cluster.pipeline_parallel} and tensor_parallel={cluster.tensor_parallel} fits a model of "
                f"{m.num_layers} layers and {m.num_heads} heads"
            ]
        )
    return options


def _gb(value: float) -> str:
    return f"{value / GIB:.2f} GB"


def infeasible(problem: FusionProblem, cost: CostModel, memory_limit: int, tasks: Sequence[TaskPlan]) -> CompileError:
    """Why nothing fits: the static state of a stage, or the task whose smallest micro-batch
    does not fit on its own."""
    costs = max(problem.placements, key=lambda c: (c.option.num_stages * c.option.tensor_parallel, min(c.headroom)))
    device = f"a {_gb(memory_limit)} device"
    tightest = min(range(len(costs.headroom)), key=costs.headroom.__getitem__)
    if costs.headroom[tightest] <= 0:
        used = planning_bytes(memory_limit) - costs.headroom[tightest]
        return CompileError(
            [
                f"cluster.memory_gb: the backbone's weights, the runtime and {len(tasks)} tasks' adapter and optimizer "
                f"state need {_gb(used)} on stage {tightest} of {device} ({MEMORY_RESERVE:.0%} of it kept free): "
                "add devices (cluster.num_devices) or raise cluster.memory_gb"
            ]
        )
    by_name = {t.name: t for t in tasks}
    worst = None
    for i, name in enumerate(problem.tasks):
        need = min(max(costs.memory[i, m]) for m in problem.microbatch_choices)
        if not any(fits(costs, (i,), m) for m in problem.microbatch_choices) and (worst is None or need > worst[1]):
            worst = (name, need)
    name, need = worst if worst else (problem.tasks[0], 0)
    task = by_name[name]
    return CompileError(
        [
            f"tasks.{name}: needs {_gb(need)} of activations at max_seq_len {task.max_seq_len} and batch_size "
            f"{task.batch_size} on {device} ({_gb(max(costs.headroom))} left after weights and adapter state): "
            "lower max_seq_len or batch_size, or add devices"
        ]
    )


def _fixed(problem: FusionProblem, mode: str) -> tuple[Decision, int] | None:
    """The best placement for one hTask of every task (``fuse``) or one per task."""
    count = len(problem.tasks)
    groups = [tuple(range(count))] if mode == "fuse" else [(i,) for i in range(count)]
    found = [best_counts(problem, p, groups) for p in range(len(problem.placements))]
    found = [f for f in found if f is not None]
    return min(found, key=lambda f: f[1]) if found else None


def plan_job(
    tasks: Sequence[TaskPlan],
    datasets: Mapping[str, TokenizedDataset],
    cost: CostModel,
    options: Sequence[PlacementOption],
    memory_limit: int,
    *,
    mode: str = "solve",
    max_htasks: int = MAX_HTASKS,
    task_tokens: int | None = None,
    align: bool = True,
) -> JobPlan:
    """Decide every phase: fusion (solved or fixed by ``mode``), micro-batches and budgets;
    ``task_tokens`` caps the tokens one task brings to a micro-batch (never below its longest
    sequence, nor below what the most micro-batches allowed need). Budgets are multiples of the
    device's chunk size, or of 1 without ``align`` (the alignment ablation)."""
    batches = {t.name: global_batches(t, datasets[t.name]) for t in tasks}
    all_names = [t.name for t in tasks]
    chunk = cost.device.chunk_tokens if align else 1
    phases, chosen = [], None
    sets = active_sets(tasks)
    budget, rounds_left = SOLVE_BUDGET, sum(count for _, count, _ in sets)
    for index, (first, count, active) in enumerate(sets):
        demands = {name: TaskDemand.of(name, batches[name][first - 1 : first - 1 + count], chunk) for name in active}
        largest = max(t.batch_size for t in tasks if t.name in active)
        choices = tuple(m for m in MICROBATCH_CHOICES if m <= largest) or (1,)
        candidates = options if chosen is None else [chosen]
        caps = {}
        if task_tokens is not None:
            for name, demand in demands.items():
                floor = max(demand.budget_for(choices[-1] * o.data_parallel) for o in candidates)
                caps[name] = max(task_tokens, floor)
        problem = FusionProblem(
            tasks=active,
            microbatch_choices=choices,
            max_htasks=min(max_htasks, len(active)),
            placements=tuple(
                placement_costs(cost, o, [demands[n] for n in active], choices, memory_limit, all_names, caps)
                for o in candidates
            ),
        )
        if mode == "solve":
            solution = solve(problem, budget * count / rounds_left)
            budget -= solution.deterministic_seconds if solution else 0.0
            if solution is None:
                raise infeasible(problem, cost, memory_limit, tasks)
            decision = solution.decision
            report = SolverReport(
                phase=index,
                method=solution.method,
                status=solution.status,
                objective_seconds=seconds(solution.objective),
                bound_seconds=seconds(min(solution.bound, solution.objective)),
                gap=round(solution.gap, 6),
                deterministic_seconds=round(solution.deterministic_seconds, 6),
                num_candidates=solution.num_candidates,
                fastest_seconds=seconds(solution.fastest),
            )
        else:
            found = _fixed(problem, mode)
            if found is None:
                raise infeasible(problem, cost, memory_limit, tasks)
            decision = found[0]
            value = seconds(found[1])
            report = SolverReport(index, "fixed", "FIXED", value, value, 0.0, 0.0, len(problem.placements), value)
        assert evaluate(problem, decision) is not None
        option = problem.placements[decision.placement].option
        chosen = option
        rounds_left -= count
        phases.append(_phase_plan(index, first, count, active, decision, demands, option, report))
    assert chosen is not None
    return JobPlan(option=chosen, phases=tuple(phases))


def interleaving(decision: Decision, num_stages: int) -> list[int]:
    """hTask order in the round: the decision's first, the rest in canonical order, its last
    (on one stage, where the order does not matter, canonical order)."""
    count = len(decision.groups)
    if count == 1 or num_stages == 1:
        return list(range(count))
    middle = [g for g in range(count) if g not in (decision.first, decision.last)]
    return [decision.first, *middle, decision.last]


def _phase_plan(
    index: int,
    first: int,
    count: int,
    active: tuple[str, ...],
    decision: Decision,
    demands: dict[str, TaskDemand],
    option: PlacementOption,
    report: SolverReport,
) -> PhasePlan:
    dp = option.data_parallel
    groups, budgets, pieces = [], {}, {}
    for g in interleaving(decision, option.num_stages):
        names = [active[i] for i in decision.groups[g]]
        groups.append(names)
        for name in names:
            budgets[name] = demands[name].budget_for(decision.microbatches[g] * dp)
            pieces[name] = demands[name].pieces(budgets[name])
    phase = fused_phase(index, first, count, active, groups, budgets, pieces, dp)
    return PhasePlan(phase=phase, demands=demands, report=report)
