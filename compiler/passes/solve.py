"""Pass 4, solve: task -> hTask fusion, micro-batches per hTask, first and last hTask of the
round, and the placement, by OR-Tools CP-SAT over `fusion_model`'s integer costs.

For each placement option (best lower bound first, skipping those whose bound cannot beat the
best found), one CP-SAT model: x[i,h] puts task i in hTask h (canonically labelled), y[h,m]
gives hTask h m micro-batches, z = x AND y; each stage's micro-batch time is bounded below by
both pieces of its GEMM roofline, the busiest stage's work plus fill and drain is minimized, and
every (hTask, m) in use keeps its worst micro-batch within each stage's memory head-room. A
deterministic greedy search gives the hint and the fallback. The solver runs single-threaded
with a deterministic time limit, so the same job gives the same plan.

A second CP-SAT pass on the fastest decision's placement then takes, among the decisions at
most `MEMORY_SLACK` slower than it, the one with the least peak memory: plans the cost model
puts that close together are not told apart by measurement, while their memory can differ
twofold (one hTask of every task holds all tasks' activations at once)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ortools.sat.python import cp_model

from .fusion_model import (
    PS,
    Decision,
    FusionProblem,
    PlacementCosts,
    end_time,
    evaluate,
    fits,
    microbatch_time,
    peak_bytes,
    steady_time,
)

DETERMINISTIC_LIMIT = 0.5
"""CP-SAT's deterministic time limit per placement option (its own work unit: about a second
of a fast core; several times that on a small cloud CPU)."""
PHASE_LIMIT = 1.5
"""A phase's default deterministic budget: no further placement option is tried once spent."""
MEMORY_SLACK = 0.03
"""How much slower (predicted round time) than the fastest decision the memory pass may go.
On the 2-core CPU, the fused, per-task and 4-micro-batch plans of the 8-task bench workload were
predicted 1-4% apart and measured within run-to-run noise; their peaks were 3.1 and 1.6-1.9 GB."""


@dataclass(frozen=True)
class Solution:
    """The chosen decision, its round time (ps), CP-SAT's bound, status and effort; ``fastest``
    is the fastest decision's round time (the chosen one is within `MEMORY_SLACK` of it)."""

    decision: Decision
    objective: int
    bound: int
    status: str
    method: str
    deterministic_seconds: float
    num_candidates: int
    fastest: int

    @property
    def gap(self) -> float:
        """How far the fastest decision found may be from the optimum, relative to it."""
        return 0.0 if self.fastest <= 0 else max(0.0, (self.fastest - self.bound) / self.fastest)


def _canonical(decision: Decision) -> Decision:
    """Groups sorted by their first task; first/last follow their groups."""
    order = sorted(range(len(decision.groups)), key=lambda g: decision.groups[g][0])
    where = {old: new for new, old in enumerate(order)}
    return Decision(
        decision.placement,
        tuple(decision.groups[g] for g in order),
        tuple(decision.microbatches[g] for g in order),
        where[decision.first],
        where[decision.last],
    )


def _best_ends(problem: FusionProblem, placement: int, groups: tuple, ms: tuple) -> tuple[Decision, int] | None:
    """The best (first, last) for fixed groups and micro-batch counts (distinct when there are
    several hTasks; ties go to the earliest pair)."""
    costs = problem.placements[placement]
    if any(not fits(costs, g, m) for g, m in zip(groups, ms)):
        return None
    steady = steady_time(costs, groups, ms)
    fill = [end_time(costs, g, m, False) for g, m in zip(groups, ms)]
    drain = [end_time(costs, g, m, True) for g, m in zip(groups, ms)]
    count = len(groups)
    pairs = [(f, t) for f in range(count) for t in range(count) if count == 1 or f != t]
    first, last = min(pairs, key=lambda pair: fill[pair[0]] + drain[pair[1]])
    return Decision(placement, groups, ms, first, last), steady + fill[first] + drain[last]


def _best_count(problem: FusionProblem, placement: int, group: tuple[int, ...]) -> int | None:
    """The group's micro-batch count with the least work that fits (None: none fits)."""
    costs = problem.placements[placement]
    scored = [
        (
            sum(
                m * (microbatch_time(costs, s, group, m, False) + microbatch_time(costs, s, group, m, True))
                for s in range(costs.option.num_stages)
            ),
            m,
        )
        for m in problem.microbatch_choices
        if fits(costs, group, m)
    ]
    return min(scored)[1] if scored else None


def best_counts(
    problem: FusionProblem,
    placement: int,
    groups: list[tuple[int, ...]],
    known: dict[tuple[int, ...], int | None] | None = None,
) -> tuple[Decision, int] | None:
    """Each group's best micro-batch count on its own (smallest work that fits), then ends;
    `known` remembers counts already worked out for groups."""
    known = {} if known is None else known
    ms = []
    for g in groups:
        if g not in known:
            known[g] = _best_count(problem, placement, g)
        if known[g] is None:
            return None
        ms.append(known[g])
    return _best_ends(problem, placement, tuple(groups), tuple(ms))


def greedy(problem: FusionProblem, placement: int) -> tuple[Decision, int] | None:
    """Deterministic local search: start from one hTask of everything (or one per task when
    that does not fit), then move single tasks to the hTask (or a new one) that lowers the
    round time most, until no move helps."""
    count = len(problem.tasks)
    known: dict[tuple[int, ...], int | None] = {}
    start = [tuple(range(count))]
    best = best_counts(problem, placement, start, known)
    if best is None:
        start = [(i,) for i in range(count)][: problem.max_htasks]
        if len(start) < count:
            start[-1] = tuple(range(problem.max_htasks - 1, count))
        best = best_counts(problem, placement, start, known)
        if best is None:
            return None
    improved = True
    while improved:
        improved = False
        groups = [list(g) for g in best[0].groups]
        for i in range(count):
            source = next(k for k, g in enumerate(groups) if i in g)
            targets = list(range(len(groups))) + ([len(groups)] if len(groups) < problem.max_htasks else [])
            for target in targets:
                if target == source:
                    continue
                moved = [list(g) for g in groups] + ([[]] if target == len(groups) else [])
                moved[source].remove(i)
                moved[target].append(i)
                candidate = [tuple(sorted(g)) for g in moved if g]
                found = best_counts(problem, placement, candidate, known)
                if found is not None and found[1] < best[1]:
                    best, improved = (_canonical(found[0]), found[1]), True
                    break
            if improved:
                break
    return _canonical(best[0]), best[1]


def lower_bound(costs: PlacementCosts, problem: FusionProblem) -> int:
    """A bound no decision on this placement beats (memory ignored)."""
    best_stage = 0
    for s in range(costs.option.num_stages):
        terms = costs.stages[s]
        total = terms.fixed[0] + terms.fixed[1]
        for i in range(len(problem.tasks)):
            total += min(
                m
                * (
                    (terms.gemm_per_token[0] + terms.gemm_per_token[1] + terms.per_token[0] + terms.per_token[1])
                    * costs.tokens[i, m]
                    + costs.own_time[i, m][s][0]
                    + costs.own_time[i, m][s][1]
                )
                for m in problem.microbatch_choices
            )
        best_stage = max(best_stage, total)
    return best_stage + costs.constant


class _Model:
    """The CP-SAT model of one placement option."""

    def __init__(self, problem: FusionProblem, placement: int) -> None:
        self.problem = problem
        self.placement = placement
        costs = self.costs = problem.placements[placement]
        model = self.model = cp_model.CpModel()
        tasks, choices = range(len(problem.tasks)), problem.microbatch_choices
        slots = range(min(problem.max_htasks, len(problem.tasks)))
        stages = range(costs.option.num_stages)
        horizon = 1
        for m in choices:
            n = sum(costs.tokens[i, m] for i in tasks)
            own = sum(sum(f + b for f, b in costs.own_time[i, m]) for i in tasks)
            shared = sum(t.fixed[0] + t.fixed[1] + t.weight[0] + t.weight[1] for t in costs.stages)
            per = sum(t.gemm_per_token[0] + t.gemm_per_token[1] + t.per_token[0] + t.per_token[1] for t in costs.stages)
            transfer = costs.option.num_stages * (costs.transfer_fixed + costs.transfer_per_token * n)
            horizon = max(horizon, m * (shared + per * n + own + transfer) * len(slots))
        horizon = 4 * horizon + costs.constant + 1
        x = self.x = {(i, h): model.NewBoolVar(f"x{i}_{h}") for i in tasks for h in slots if h <= i}
        y = self.y = {(h, m): model.NewBoolVar(f"y{h}_{m}") for h in slots for m in choices}
        used = {h: model.NewBoolVar(f"used{h}") for h in slots}
        for i in tasks:
            model.AddExactlyOne(x[i, h] for h in slots if h <= i)
        for h in slots:
            members = [x[i, h] for i in tasks if h <= i]
            for var in members:
                model.AddImplication(var, used[h])
            model.AddBoolOr(members).OnlyEnforceIf(used[h])
            model.Add(sum(y[h, m] for m in choices) == used[h])
            if h > 0:
                for i in tasks:
                    if h <= i:
                        model.AddBoolOr([x[j, h - 1] for j in range(h - 1, i)]).OnlyEnforceIf(x[i, h])
        z = {}
        for (i, h), xv in x.items():
            for m in choices:
                zv = z[i, h, m] = model.NewBoolVar(f"z{i}_{h}_{m}")
                model.AddImplication(zv, xv)
                model.AddImplication(zv, y[h, m])
                model.AddBoolOr([xv.Not(), y[h, m].Not(), zv])
        self.z = z
        times = {}
        for s in stages:
            terms = costs.stages[s]
            for h in slots:
                for m in choices:
                    members = [(i, z[i, h, m]) for i in tasks if (i, h, m) in z]
                    n = sum(costs.tokens[i, m] * zv for i, zv in members)
                    for backward in (0, 1):
                        own = sum(costs.own_time[i, m][s][backward] * zv for i, zv in members)
                        t = times[s, h, m, backward] = model.NewIntVar(0, horizon, f"t{s}_{h}_{m}_{backward}")
                        base = terms.fixed[backward] * y[h, m] + terms.per_token[backward] * n + own
                        model.Add(t >= base + terms.gemm_per_token[backward] * n)
                        model.Add(t >= base + terms.weight[backward] * y[h, m])
                    if s == 0:
                        for room_stage, room in enumerate(costs.headroom):
                            model.Add(sum(costs.memory[i, m][room_stage] * zv for i, zv in members) <= max(room, 0))
        busiest = model.NewIntVar(0, horizon, "busiest")
        model.Add(busiest >= lower_bound(costs, problem) - costs.constant)
        for s in stages:
            model.Add(busiest >= sum(m * (times[s, h, m, 0] + times[s, h, m, 1]) for h in slots for m in choices))
        objective = busiest + costs.constant
        num_stages = costs.option.num_stages
        if num_stages > 1:
            first = self.first = {h: model.NewBoolVar(f"first{h}") for h in slots}
            last = self.last = {h: model.NewBoolVar(f"last{h}") for h in slots}
            model.AddExactlyOne(first.values())
            model.AddExactlyOne(last.values())
            fill = model.NewIntVar(0, horizon, "fill")
            drain = model.NewIntVar(0, horizon, "drain")
            for h in slots:
                model.AddImplication(first[h], used[h])
                model.AddImplication(last[h], used[h])
                others = sum(used[g] for g in slots if g != h)
                model.Add(others <= (len(slots) - 1) * (2 - first[h] - last[h]))
                for var, ends, backward, stage_range in (
                    (fill, first, 0, range(num_stages - 1)),
                    (drain, last, 1, range(1, num_stages)),
                ):
                    carried = sum(costs.tokens[i, m] * z[i, h, m] for m in choices for i in tasks if (i, h, m) in z)
                    latency = sum(y[h, m] for m in choices)
                    transfer = (num_stages - 1) * (costs.transfer_fixed * latency + costs.transfer_per_token * carried)
                    spent = sum(times[s, h, m, backward] for s in stage_range for m in choices)
                    model.Add(var >= spent + transfer - horizon * (1 - ends[h]))
            objective = objective + fill + drain
        self.objective = objective
        model.Minimize(objective)

    def least_memory_within(self, round_time: int) -> None:
        """Minimize peak memory instead (`fusion_model.peak_bytes`), over decisions whose round
        time is at most ``round_time``."""
        costs, model = self.costs, self.model
        peak = model.NewIntVar(0, max(costs.static) + max(max(room, 0) for room in costs.headroom), "peak")
        for s, static in enumerate(costs.static):
            for h in sorted({g for _, g, _ in self.z}):
                held = sum(costs.memory[i, m][s] * zv for (i, g, m), zv in self.z.items() if g == h)
                model.Add(peak >= static + held)
        model.Add(self.objective <= round_time)
        model.Minimize(peak)

    def hint(self, decision: Decision) -> None:
        """Start the search from ``decision`` (canonical: hTask h's first task is at least h)."""
        slot = {i: h for h, group in enumerate(decision.groups) for i in group}
        for (i, h), var in self.x.items():
            self.model.AddHint(var, slot[i] == h)
        for (h, m), var in self.y.items():
            self.model.AddHint(var, h < len(decision.groups) and decision.microbatches[h] == m)
        for (i, h, m), var in self.z.items():
            self.model.AddHint(var, slot[i] == h and decision.microbatches[h] == m)
        if self.costs.option.num_stages > 1:
            for h in self.first:
                self.model.AddHint(self.first[h], h == decision.first)
                self.model.AddHint(self.last[h], h == decision.last)

    def solve(self, limit: float) -> tuple[Decision, int, int, str, float] | None:
        """Solve; the decision, objective, bound, status name and deterministic time (the
        objective and bound are peak bytes after `least_memory_within`)."""
        solver = cp_model.CpSolver()
        solver.parameters.num_search_workers = 1
        solver.parameters.max_deterministic_time = limit
        solver.parameters.random_seed = 0
        status = solver.Solve(self.model)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return None
        groups: dict[int, list[int]] = {}
        for (i, h), var in self.x.items():
            if solver.Value(var):
                groups.setdefault(h, []).append(i)
        labels = sorted(groups)
        ms = tuple(next(m for m in self.problem.microbatch_choices if solver.Value(self.y[h, m])) for h in labels)
        if self.costs.option.num_stages > 1:
            first = labels.index(next(h for h in labels if solver.Value(self.first[h])))
            last = labels.index(next(h for h in labels if solver.Value(self.last[h])))
        else:
            first, last = 0, len(labels) - 1
        decision = Decision(self.placement, tuple(tuple(sorted(groups[h])) for h in labels), ms, first, last)
        bound = round(solver.BestObjectiveBound())  # CP-SAT reports integer objectives as floats
        return decision, round(solver.ObjectiveValue()), bound, solver.StatusName(status), solver.deterministic_time


def solve(problem: FusionProblem, budget: float = PHASE_LIMIT, memory_slack: float = MEMORY_SLACK) -> Solution | None:
    """The best decision over every placement option (None: nothing fits in memory): the
    fastest, or the least-memory one on its placement at most ``memory_slack`` slower.

    Options are tried best lower bound first, each from the greedy search's decision and, while
    the phase's deterministic ``budget`` lasts, improved by CP-SAT (at most
    `DETERMINISTIC_LIMIT` each); an option whose bound cannot beat the best found is skipped.
    The reported bound is the weakest over the options: CP-SAT's or the option's own bound,
    whichever is higher."""
    bounds = sorted((lower_bound(c, problem), p) for p, c in enumerate(problem.placements))
    best: Solution | None = None
    spent = 0.0
    candidates = 0
    weakest = None
    for bound, placement in bounds:
        if best is not None and bound >= best.objective:
            weakest = bound if weakest is None else min(weakest, bound)
            continue
        candidates += 1
        start = greedy(problem, placement)
        limit = min(DETERMINISTIC_LIMIT, budget - spent)
        result = _improved(problem, placement, start, limit) if limit > 0 else None
        if result is None:
            if start is None:
                continue
            status = "FALLBACK" if limit > 0 else "BUDGET"
            result = Solution(start[0], start[1], bound, status, "greedy", 0.0, 0, start[1])
        spent += result.deterministic_seconds
        result = dataclasses.replace(result, bound=max(result.bound, bound))
        weakest = result.bound if weakest is None else min(weakest, result.bound)
        if best is None or result.objective < best.objective:
            best = result
    if best is None:
        return None
    assert weakest is not None
    decision, objective = best.decision, best.objective
    limit = min(DETERMINISTIC_LIMIT, budget - spent)
    if best.method == "cp-sat" and limit > 0:
        lighter, effort = _least_memory(problem, best, int(best.objective * (1 + memory_slack)), limit)
        spent += effort
        if lighter is not None:
            decision, objective = lighter
    bound = min(weakest, best.objective)
    return Solution(decision, objective, bound, best.status, best.method, spent, candidates, best.objective)


def _least_memory(
    problem: FusionProblem, fastest: Solution, round_time: int, limit: float
) -> tuple[tuple[Decision, int] | None, float]:
    """The least-memory decision on ``fastest``'s placement with a round of at most
    ``round_time``, with its round time, when it needs less memory than ``fastest``; and
    CP-SAT's effort."""
    placement = fastest.decision.placement
    costs = problem.placements[placement]
    model = _Model(problem, placement)
    model.least_memory_within(round_time)
    model.hint(fastest.decision)
    solved = model.solve(limit)
    if solved is None:
        return None, 0.0
    decision, reported, _, _, effort = solved
    value = evaluate(problem, decision)
    peak = peak_bytes(costs, decision.groups, decision.microbatches)
    assert value is not None and peak <= reported, f"CP-SAT peak {reported}, evaluated {peak}"
    if peak >= peak_bytes(costs, fastest.decision.groups, fastest.decision.microbatches):
        return None, effort
    return (_canonical(decision), value), effort


def _improved(
    problem: FusionProblem, placement: int, start: tuple[Decision, int] | None, limit: float
) -> Solution | None:
    """CP-SAT on one placement option from the greedy ``start``; None when it finds nothing."""
    model = _Model(problem, placement)
    if start is not None:
        model.hint(start[0])
    solved = model.solve(limit)
    if solved is None:
        return None
    decision, objective, cp_bound, status, effort = solved
    value = evaluate(problem, decision)
    assert value is not None and value <= objective, f"CP-SAT objective {objective}, evaluated {value}"
    assert status != "OPTIMAL" or value == objective, f"CP-SAT optimum {objective}, evaluated {value}"
    if start is not None and start[1] < value:
        return Solution(start[0], start[1], cp_bound, "FEASIBLE", "cp-sat", effort, 0, start[1])
    return Solution(_canonical(decision), value, cp_bound, status, "cp-sat", effort, 0, value)


def seconds(picoseconds: int) -> float:
    """Picoseconds as seconds."""
    return picoseconds / PS
