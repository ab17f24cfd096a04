"""The fusion solver against brute-force enumeration over the same cost model."""

from __future__ import annotations

import itertools

from hypothesis import example, given, settings
from hypothesis import strategies as st

from muxtune.compiler.passes.fusion_model import (
    Decision,
    FusionProblem,
    PlacementCosts,
    PlacementOption,
    StageTerms,
    evaluate,
    peak_bytes,
)
from muxtune.compiler.passes.solve import MEMORY_SLACK, greedy, solve


def set_partitions(items: list[int], max_blocks: int):
    """Every split of ``items`` into at most ``max_blocks`` non-empty blocks."""
    if not items:
        yield []
        return
    head, rest = items[0], items[1:]
    for partition in set_partitions(rest, max_blocks):
        for k in range(len(partition)):
            yield partition[:k] + [[head, *partition[k]]] + partition[k + 1 :]
        if len(partition) < max_blocks:
            yield [[head], *partition]


def every_decision(problem: FusionProblem, placements: range | None = None):
    """Every (decision, round time) that fits memory: placement, split, micro-batch counts, ends."""
    tasks = list(range(len(problem.tasks)))
    for placement in placements if placements is not None else range(len(problem.placements)):
        for partition in set_partitions(tasks, problem.max_htasks):
            groups = tuple(tuple(sorted(g)) for g in partition)
            for ms in itertools.product(problem.microbatch_choices, repeat=len(groups)):
                for first, last in itertools.product(range(len(groups)), repeat=2):
                    if len(groups) > 1 and first == last:
                        continue
                    decision = Decision(placement, groups, ms, first, last)
                    value = evaluate(problem, decision)
                    if value is not None:
                        yield decision, value


def brute_force(problem: FusionProblem) -> int | None:
    """The smallest round time over every decision."""
    return min((value for _, value in every_decision(problem)), default=None)


def least_memory(problem: FusionProblem, placement: int, round_time: int) -> int:
    """The least peak memory on ``placement`` over decisions no slower than ``round_time``."""
    costs = problem.placements[placement]
    return min(
        peak_bytes(costs, d.groups, d.microbatches)
        for d, value in every_decision(problem, range(placement, placement + 1))
        if value <= round_time
    )


@st.composite
def problems(draw) -> FusionProblem:
    num_tasks = draw(st.integers(1, 6))
    choices = tuple(sorted(draw(st.sets(st.sampled_from([1, 2, 3, 4]), min_size=1, max_size=3))))
    max_htasks = draw(st.integers(1, 3))
    placements = []
    for _ in range(draw(st.integers(1, 2))):
        num_stages = draw(st.integers(1, 2))
        small = st.integers(0, 50)
        stages = tuple(
            StageTerms(
                fixed=(draw(small), draw(small)),
                gemm_per_token=(draw(st.integers(0, 5)), draw(st.integers(0, 5))),
                weight=(draw(st.integers(0, 400)), draw(st.integers(0, 400))),
                per_token=(draw(st.integers(0, 3)), draw(st.integers(0, 3))),
            )
            for _ in range(num_stages)
        )
        tokens, own, memory = {}, {}, {}
        for i in range(num_tasks):
            size = draw(st.integers(1, 100))
            for m in choices:
                tokens[i, m] = max(1, size // m)
                own[i, m] = tuple((draw(small), draw(small)) for _ in range(num_stages))
                memory[i, m] = tuple(draw(st.integers(0, 60)) // m for _ in range(num_stages))
        placements.append(
            PlacementCosts(
                option=PlacementOption(tuple([1] * num_stages), 1, 1),
                stages=stages,
                static=tuple(draw(st.integers(0, 100)) for _ in range(num_stages)),
                headroom=tuple(draw(st.integers(10, 200)) for _ in range(num_stages)),
                tokens=tokens,
                own_time=own,
                memory=memory,
                transfer_fixed=draw(small),
                transfer_per_token=draw(st.integers(0, 2)),
                constant=draw(small),
            )
        )
    return FusionProblem(tuple(f"t{i}" for i in range(num_tasks)), choices, max_htasks, tuple(placements))


CP_SAT_FLOAT_OBJECTIVE = FusionProblem(
    tasks=("t0", "t1", "t2"),
    microbatch_choices=(3,),
    max_htasks=3,
    placements=(
        PlacementCosts(
            option=PlacementOption(stage_layers=(1,), tensor_parallel=1, data_parallel=1),
            stages=(StageTerms(fixed=(0, 0), gemm_per_token=(0, 0), weight=(0, 8), per_token=(0, 0)),),
            static=(0,),
            headroom=(10,),
            tokens={(i, 3): 1 for i in range(3)},
            own_time={(i, 3): ((0, 0),) for i in range(3)},
            memory={(i, 3): (0,) for i in range(3)},
            transfer_fixed=0,
            transfer_per_token=0,
            constant=2,
        ),
    ),
)
"""CP-SAT reports this optimum (26) as 25.999999999999993."""


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from([0.0, MEMORY_SLACK, 0.25, 1.0]))
@example(CP_SAT_FLOAT_OBJECTIVE, MEMORY_SLACK)
def test_solver_matches_brute_force(problem: FusionProblem, slack: float) -> None:
    """The fastest round equals brute force's; the chosen decision is the least-memory one on
    its placement within ``slack`` of it."""
    expected = brute_force(problem)
    solution = solve(problem, memory_slack=slack)
    if expected is None:
        assert solution is None
        return
    assert solution is not None
    assert solution.status == "OPTIMAL"
    assert solution.fastest == expected
    limit = int(expected * (1 + slack))
    assert solution.objective == evaluate(problem, solution.decision) <= limit
    costs = problem.placements[solution.decision.placement]
    peak = peak_bytes(costs, solution.decision.groups, solution.decision.microbatches)
    assert peak == least_memory(problem, solution.decision.placement, limit)


@settings(max_examples=30, deadline=None)
@given(problems())
def test_greedy_is_feasible_and_never_beats_the_optimum(problem: FusionProblem) -> None:
    expected = brute_force(problem)
    found = [greedy(problem, p) for p in range(len(problem.placements))]
    values = [f[1] for f in found if f is not None]
    for f in found:
        if f is not None:
            assert evaluate(problem, f[0]) == f[1]
    if values:
        assert expected is not None and min(values) >= expected
