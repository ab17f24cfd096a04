"""The simulate pass: round times, bubbles, exposed communication and peak memory of the example
plans, checked against numbers derived by hand from a small fake cost model."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plans"))

from plan_helpers import build_data_parallel_plan, build_pipeline_plan, build_plan  # noqa: E402

from muxtune.compiler.cost.load import MicroBatchLoad, SegmentLoad, total_tokens  # noqa: E402
from muxtune.compiler.passes.simulate import (  # noqa: E402
    COMMUNICATION_STREAM,
    Loads,
    PhaseSimulation,
    simulate_phase,
    simulate_plan,
)
from muxtune.plans import (  # noqa: E402
    AllReduce,
    Forward,
    Instruction,
    LoadBatches,
    Phase,
    Plan,
    RecordEvent,
    Recv,
    Send,
    Subgraph,
    WaitEvent,
)

LOAD = 0.125  # seconds per micro-batch loaded
LOSS = 0.5  # loss seconds per forward second
OPTIMIZER = 0.0625  # seconds per task stepped
ALL_REDUCE = 0.75
SLOWDOWN = 1.5  # each compute instruction of a two-stream body


class FakeCosts:
    """Forward: tokens / 1024 s per subgraph, backward twice that; activations 10 bytes per token
    times (subgraph id + 1), 3 per token for the loss, 7 for a boundary; static 1000 * (rank + 1)."""

    def __init__(self, transfer: float = 0.25):
        self.transfer = transfer

    def forward_seconds(self, subgraph: Subgraph, load: MicroBatchLoad) -> float:
        return total_tokens(load) / 1024

    def backward_seconds(self, subgraph: Subgraph, load: MicroBatchLoad) -> float:
        return 2 * total_tokens(load) / 1024

    def loss_seconds(self, load: MicroBatchLoad) -> float:
        return LOSS * total_tokens(load) / 1024

    def transfer_seconds(self, load: MicroBatchLoad) -> float:
        return self.transfer

    def all_reduce_seconds(self, tasks: Sequence[str], group_size: int) -> float:
        return ALL_REDUCE

    def optimizer_seconds(self, tasks: Sequence[str]) -> float:
        return OPTIMIZER * len(tasks)

    def load_batches_seconds(self, loads: Sequence[MicroBatchLoad]) -> float:
        return LOAD * len(loads)

    def concurrent_slowdown(self, streams: int) -> float:
        return 1.0 if streams <= 1 else SLOWDOWN

    def activation_bytes(self, subgraph: Subgraph, load: MicroBatchLoad) -> int:
        return int(total_tokens(load)) * 10 * (subgraph.id + 1)

    def loss_activation_bytes(self, load: MicroBatchLoad) -> int:
        return int(total_tokens(load)) * 3

    def boundary_bytes(self, load: MicroBatchLoad) -> int:
        return int(total_tokens(load)) * 7

    def static_bytes(self, rank: int) -> int:
        return 1000 * (rank + 1)


Tokens = Callable[[int, int], int]


def varied(h: int, m: int) -> int:
    return 256 + 128 * h + 64 * m


def loads_of(phase: Phase, tokens: Tokens = lambda h, m: 256) -> Loads:
    """Every micro-batch of the phase, its tokens split evenly among its hTask's tasks."""
    out: dict[tuple[int, int], MicroBatchLoad] = {}
    for h in phase.htasks:
        for m in range(h.num_microbatches):
            share = tokens(h.id, m) / len(h.tasks)
            out[(h.id, m)] = {t: SegmentLoad(share, 1.0, share / 2, share * share) for t in h.tasks}
    return out


def simulate(plan: Plan, phase: int = 0, tokens: Tokens = lambda h, m: 256, **costs: float) -> PhaseSimulation:
    return simulate_phase(plan, phase, loads_of(plan.phases[phase], tokens), FakeCosts(**costs))


def with_body(plan: Plan, rank: int, body: Sequence[Instruction], phase: int = 0) -> Plan:
    """``plan`` with rank ``rank``'s round body of ``phase`` replaced."""
    programs = list(plan.programs)
    phases = list(programs[rank].phases)
    phases[phase] = tuple(body)
    programs[rank] = dataclasses.replace(programs[rank], phases=tuple(phases))
    return dataclasses.replace(plan, programs=tuple(programs))


def entries(sim: PhaseSimulation, rank: int, op: str) -> list:
    return [e for e in sim.timeline if e.rank == rank and e.op == op]


def test_one_rank_round_is_the_sum_of_its_instructions() -> None:
    plan = build_plan()
    sims = simulate_plan(plan, [loads_of(p, varied) for p in plan.phases], FakeCosts())
    for phase, sim in zip(plan.phases, sims):
        expected = OPTIMIZER * len(phase.tasks)
        for h in phase.htasks:
            expected += LOAD * h.num_microbatches
            for m in range(h.num_microbatches):
                f = varied(h.id, m) / 1024
                expected += 3 * f + LOSS * f + 3 * 2 * f
        assert sim.phase == phase.id
        assert sim.seconds_per_round == pytest.approx(expected)
        assert sim.busy_seconds == (pytest.approx(expected),)
        assert sim.bubble_fraction == pytest.approx(0.0, abs=1e-12)
        assert sim.exposed_communication_seconds == 0.0
        assert len(sim.timeline) == len(plan.programs[0].phases[phase.id])


def test_one_rank_peak_memory_is_the_largest_micro_batch() -> None:
    plan = build_plan()
    sim = simulate(plan, tokens=varied)
    largest = max(varied(h.id, m) for h in plan.phases[0].htasks for m in range(h.num_microbatches))
    assert sim.peak_memory_bytes == (1000 + largest * 10 * (1 + 2 + 3) + largest * 3,)


def test_gpipe_pipeline_matches_hand_derived_schedule() -> None:
    sim = simulate(build_pipeline_plan())
    load, f, b, c, t, o = 2 * LOAD, 0.25, 0.5, LOSS * 0.25, 0.25, 2 * OPTIMIZER
    stage = 2 * f + c + 2 * b  # one micro-batch on rank 1: two forwards, loss, two backwards
    makespan = load + f + t + 2 * stage + t + b + o
    busy = (load + 2 * f + 2 * b + o, load + 2 * stage + o)
    assert sim.seconds_per_round == pytest.approx(makespan)
    assert sim.busy_seconds == pytest.approx(busy)
    assert 0 < sim.bubble_fraction == pytest.approx(1 - sum(busy) / (2 * makespan))
    # rank 0 idles from its last forward until the second gradient arrives, minus one backward
    assert sim.exposed_communication_seconds == pytest.approx(f + t + 2 * stage + t - 2 * f - b)
    # rank 0: two micro-batches' activations and one gradient; rank 1: the boundary of the
    # next micro-batch arrives while the first one's loss runs
    assert sim.peak_memory_bytes == (1000 + 256 * (10 + 10 + 7), 2000 + 256 * (7 + 20 + 30 + 3 + 7))


@pytest.mark.parametrize("transfer", [0.25, 1.0])
def test_transfers_delay_the_receiver(transfer: float) -> None:
    sim = simulate(build_pipeline_plan(), transfer=transfer)
    load, f = 2 * LOAD, 0.25
    assert entries(sim, 1, "forward")[0].start == pytest.approx(load + f + transfer)
    sends = entries(sim, 0, "send")
    assert all(s.stream == COMMUNICATION_STREAM for s in sends)
    assert sends[1].start == pytest.approx(max(load + 2 * f, load + f + transfer))  # one link per rank
    recv = entries(sim, 1, "recv")[0]
    assert (recv.start, recv.end) == pytest.approx((load, load + f + transfer))


def test_all_reduce_waits_for_the_slowest_rank() -> None:
    plan = build_data_parallel_plan()
    body = plan.programs[1].phases[0]
    plan = with_body(plan, 1, (LoadBatches(0, 0), *body))  # rank 1 loads one extra hTask batch
    sim = simulate(plan)
    h = plan.phases[0].htasks[0]
    f = 0.25
    compute = LOAD * h.num_microbatches + h.num_microbatches * (3 * f + LOSS * f + 6 * f)
    slow = compute + LOAD * h.num_microbatches
    reduces = [entries(sim, r, "all_reduce")[0] for r in (0, 1)]
    assert [t for e in reduces for t in (e.start, e.end)] == pytest.approx(
        [compute, slow + ALL_REDUCE, slow, slow + ALL_REDUCE]
    )
    assert sim.seconds_per_round == pytest.approx(slow + ALL_REDUCE + OPTIMIZER * len(h.tasks))
    assert sim.exposed_communication_seconds == pytest.approx(slow - compute + ALL_REDUCE)
    assert entries(sim, 0, "optimizer_step")[0].start == pytest.approx(slow + ALL_REDUCE)


def test_events_order_work_across_streams() -> None:
    plan = build_plan()
    body = [
        LoadBatches(0, 0),
        RecordEvent("loaded", 0),
        WaitEvent("loaded", 1),
        Forward(0, 0, 0, 1),
        Forward(0, 1, 0, 0),
        RecordEvent("first", 1),
        WaitEvent("first", 0),
        Forward(0, 0, 1, 0),
    ]
    sim = simulate(with_body(plan, 0, body), tokens=varied)
    # two streams share the device: every compute instruction takes SLOWDOWN times its cost, until
    # stream 0 has waited for stream 1's closing event: its last forward has the device alone
    load, f0, f1 = 2 * LOAD * SLOWDOWN, varied(0, 0) / 1024 * SLOWDOWN, varied(0, 1) / 1024 * SLOWDOWN
    alone = f0 / SLOWDOWN
    forwards = entries(sim, 0, "forward")
    assert [e.stream for e in forwards] == [1, 0, 0]
    assert [t for e in forwards for t in (e.start, e.end)] == pytest.approx(
        [load, load + f0, load, load + f1, load + max(f0, f1), load + max(f0, f1) + alone]
    )
    assert sim.seconds_per_round == pytest.approx(load + max(f0, f1) + alone)
    assert sim.bubble_fraction == 0.0  # overlapping streams: busy exceeds the round, clamped


def test_a_recv_without_its_send_deadlocks() -> None:
    plan = build_pipeline_plan()
    body = [i for i in plan.programs[0].phases[0] if not (isinstance(i, Send) and i.microbatch == 0)]
    with pytest.raises(AssertionError, match="deadlocks: .*rank 1 waits at instruction 1 "):
        simulate(with_body(plan, 0, body))


def test_an_all_reduce_a_rank_never_reaches_deadlocks() -> None:
    plan = build_data_parallel_plan()
    body = [i for i in plan.programs[1].phases[0] if not isinstance(i, AllReduce)]
    with pytest.raises(AssertionError, match="deadlocks: rank 0 waits"):
        simulate(with_body(plan, 1, body))


def test_a_send_nobody_receives_is_an_error() -> None:
    plan = build_pipeline_plan()
    body = [i for i in plan.programs[1].phases[0] if not (isinstance(i, Recv) and i.microbatch == 1)]
    with pytest.raises(AssertionError, match="nobody receives"):
        simulate(with_body(plan, 1, body))


def test_missing_loads_are_refused() -> None:
    plan = build_pipeline_plan()
    loads = dict(loads_of(plan.phases[0]))
    del loads[(0, 1)]
    with pytest.raises(ValueError, match=r"hTask 0 micro-batches \[1\]"):
        simulate_phase(plan, 0, loads, FakeCosts())
    with pytest.raises(ValueError, match="phase loads"):
        simulate_plan(plan, [loads], FakeCosts())


@pytest.mark.parametrize("build", [build_plan, build_pipeline_plan, build_data_parallel_plan])
def test_simulation_is_deterministic(build: Callable[[], Plan]) -> None:
    plan = build()
    runs = [simulate_plan(plan, [loads_of(p, varied) for p in plan.phases], FakeCosts()) for _ in range(2)]
    assert runs[0] == runs[1]
    for sim in runs[0]:
        assert 0.0 <= sim.bubble_fraction <= 1.0
        assert len(sim.peak_memory_bytes) == len(sim.busy_seconds) == len(plan.programs)
