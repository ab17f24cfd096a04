"""The simulate pass: replay one round of each phase's rank programs on the cost model.

A discrete-event replay over ranks and streams. Every rank starts the round at t=0 and issues
its round body in program order. Compute instructions (forward, backward, loss, load, optimizer
step; checkpoint and free at cost 0) run on their stream (stream 0 when they name none), one at a
time per stream, no earlier than the rank's issue point. Issuing is free: the issue point only
moves when the program blocks, on a `Recv` (until the message has arrived) or an `AllReduce`
(until it ends). A `Send` never blocks: it leaves when the work issued on stream 0 so far is done,
occupies the rank's one outgoing link, and arrives ``transfer_seconds`` later. Events carry
completion times across streams. Exposed communication is the time a rank is blocked while all
its streams are idle (plus the all-reduces themselves); memory is the sum of live buffers.
A body whose hTasks run on several streams shares the device between them: every compute
instruction of it takes ``concurrent_slowdown(streams)`` times its cost alone, except on a stream
that has waited for every other stream's closing event (`closing_events`), which from then on
has the device to itself. A body of several rounds (`Phase.rounds_per_body`) is replayed whole
and its times divided by its rounds; the timeline keeps the body's own times.

Times depend only on each rank's own program, the messages it receives and the all-reduces it
joins, so the order in which ranks are advanced does not change the result: the replay is
deterministic (program order, rank order, no float sums over unordered collections).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from muxtune.compiler.cost.load import MicroBatchLoad
from muxtune.plans import (
    AllReduce,
    Backward,
    Checkpoint,
    Forward,
    Free,
    Instruction,
    LoadBatches,
    LossBackward,
    OptimizerStep,
    Plan,
    RecordEvent,
    Recv,
    Send,
    Subgraph,
    WaitEvent,
)
from muxtune.plans.stream_checks import closing_events, runs_alone

COMPUTE_STREAM = 0
"""The stream of instructions that name none (and the one a `Send` waits for)."""

COMMUNICATION_STREAM = -1
"""The ``stream`` of timeline entries of sends (the rank's link), recvs and all-reduces."""


class InstructionCosts(Protocol):
    """Seconds and bytes of each instruction, as the simulator asks the cost model."""

    def forward_seconds(self, subgraph: Subgraph, load: MicroBatchLoad) -> float: ...
    def backward_seconds(self, subgraph: Subgraph, load: MicroBatchLoad) -> float: ...
    def loss_seconds(self, load: MicroBatchLoad) -> float: ...
    def transfer_seconds(self, load: MicroBatchLoad) -> float: ...
    def all_reduce_seconds(self, tasks: Sequence[str], group_size: int) -> float: ...
    def optimizer_seconds(self, tasks: Sequence[str]) -> float: ...
    def load_batches_seconds(self, loads: Sequence[MicroBatchLoad]) -> float: ...
    def concurrent_slowdown(self, streams: int) -> float: ...
    def activation_bytes(self, subgraph: Subgraph, load: MicroBatchLoad) -> int: ...
    def loss_activation_bytes(self, load: MicroBatchLoad) -> int: ...
    def boundary_bytes(self, load: MicroBatchLoad) -> int: ...
    def static_bytes(self, rank: int) -> int: ...


@dataclass(frozen=True)
class TimelineEntry:
    """One instruction of one rank in the simulated round (``index`` in its round body)."""

    rank: int
    stream: int
    start: float
    end: float
    index: int
    op: str
    htask: int | None
    microbatch: int | None
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class PhaseSimulation:
    """The simulated round of a phase; per-rank tuples are in rank order."""

    phase: int
    seconds_per_round: float
    busy_seconds: tuple[float, ...]
    bubble_fraction: float
    exposed_communication_seconds: float
    peak_memory_bytes: tuple[int, ...]
    timeline: tuple[TimelineEntry, ...]


Loads = Mapping[tuple[int, int], MicroBatchLoad]
"""(hTask, micro-batch) -> what the micro-batch carries, for one phase."""

_Message = tuple[int, int, int, int, int, bool]
"""(sender, receiver, hTask, micro-batch, subgraph, grad)."""


@dataclass
class _Rank:
    """One rank's replay state."""

    rank: int
    body: tuple[Instruction, ...]
    pc: int = 0
    issue: float = 0.0
    link: float = 0.0
    busy: float = 0.0
    exposed: float = 0.0
    streams: dict[int, float] = field(default_factory=dict)
    events: dict[str, float] = field(default_factory=dict)
    waited: dict[int, set[str]] = field(default_factory=dict)
    alone: set[int] = field(default_factory=set)
    """Streams that have joined the end of every other stream (they run at full speed)."""
    reduces: dict[tuple[int, ...], int] = field(default_factory=dict)
    held: dict[tuple[int, int], list[tuple[float, int]]] = field(default_factory=dict)
    buffers: list[tuple[float, float, int, bool]] = field(default_factory=list)
    """(allocated, released, bytes, transient) of every buffer released so far."""

    @property
    def done(self) -> bool:
        return self.pc == len(self.body)

    def idle(self) -> float:
        """When everything issued so far has finished."""
        return max(self.issue, *self.streams.values()) if self.streams else self.issue

    def finish(self) -> float:
        return max(self.idle(), self.link)


class _Round:
    """The replay of one phase's round bodies."""

    def __init__(self, plan: Plan, phase: int, loads: Loads, costs: InstructionCosts):
        self.costs = costs
        self.loads = loads
        self.subgraphs = {s.id: s for s in plan.partition.subgraphs}
        self.phase = plan.phases[phase]
        for h in self.phase.htasks:
            missing = [m for m in range(h.num_microbatches) if (h.id, m) not in loads]
            if missing:
                raise ValueError(f"phase {phase}: no load for hTask {h.id} micro-batches {missing}")
        programs = sorted(plan.programs, key=lambda p: p.rank)
        self.ranks = [_Rank(p.rank, p.phases[phase]) for p in programs]
        self.slowdown = {r.rank: costs.concurrent_slowdown(len(_streams(r.body))) for r in self.ranks}
        self.closing = {r.rank: closing_events(r.body) for r in self.ranks}
        self.messages: dict[_Message, deque[float]] = {}
        self.arrivals: dict[tuple[tuple[int, ...], int], dict[int, tuple[float, tuple[str, ...]]]] = {}
        self.timeline: list[TimelineEntry] = []

    def run(self) -> None:
        progress = True
        while progress:
            progress = False
            for rank in self.ranks:
                while not rank.done and self.step(rank):
                    rank.pc += 1
                    progress = True
        blocked = [f"rank {r.rank} waits at instruction {r.pc} ({r.body[r.pc]})" for r in self.ranks if not r.done]
        assert not blocked, "simulated round deadlocks: " + "; ".join(blocked)
        unread = sorted(key for key, queue in self.messages.items() if queue)
        assert not unread, f"simulated round sends messages nobody receives: {unread}"

    def entry(self, rank: _Rank, stream: int, start: float, end: float, instruction: Instruction) -> None:
        htask = getattr(instruction, "htask", None)
        if isinstance(instruction, (AllReduce, OptimizerStep)):
            tasks = instruction.tasks
        else:
            tasks = self.phase.htask_of_instance(htask).tasks if htask is not None else ()
        microbatch = getattr(instruction, "microbatch", None)
        op = instruction.op.value
        self.timeline.append(TimelineEntry(rank.rank, stream, start, end, rank.pc, op, htask, microbatch, tasks))

    def compute(self, rank: _Rank, stream: int, seconds: float, instruction: Instruction) -> tuple[float, float]:
        start = max(rank.issue, rank.streams.get(stream, 0.0))
        seconds *= 1.0 if stream in rank.alone else self.slowdown[rank.rank]
        end = start + seconds
        rank.streams[stream] = end
        rank.busy += seconds
        self.entry(rank, stream, start, end, instruction)
        return start, end

    def load(self, instance: int, microbatch: int) -> MicroBatchLoad:
        """The load of a micro-batch of an hTask instance (every round of a body alike)."""
        return self.loads[(self.phase.htask_of_instance(instance).id, microbatch)]

    def step(self, rank: _Rank) -> bool:
        """Run the rank's next instruction; False when it must wait for another rank."""
        ins = rank.body[rank.pc]
        costs = self.costs
        if isinstance(ins, (Forward, Backward, LossBackward)):
            load = self.load(ins.htask, ins.microbatch)
            if isinstance(ins, LossBackward):
                start, end = self.compute(rank, ins.stream, costs.loss_seconds(load), ins)
                rank.buffers.append((start, end, costs.loss_activation_bytes(load), True))
            elif isinstance(ins, Forward):
                subgraph = self.subgraphs[ins.subgraph]
                start, _ = self.compute(rank, ins.stream, costs.forward_seconds(subgraph, load), ins)
                held = rank.held.setdefault((ins.htask, ins.microbatch), [])
                held.append((start, costs.activation_bytes(subgraph, load)))
            else:
                self.compute(rank, ins.stream, costs.backward_seconds(self.subgraphs[ins.subgraph], load), ins)
        elif isinstance(ins, LoadBatches):
            htask = self.phase.htask_of_instance(ins.htask)
            loads = [self.load(ins.htask, m) for m in range(htask.num_microbatches)]
            self.compute(rank, ins.stream, costs.load_batches_seconds(loads), ins)
        elif isinstance(ins, OptimizerStep):
            self.compute(rank, ins.stream, costs.optimizer_seconds(ins.tasks), ins)
        elif isinstance(ins, Checkpoint):
            self.compute(rank, COMPUTE_STREAM, 0.0, ins)
        elif isinstance(ins, Free):
            at, _ = self.compute(rank, ins.stream, 0.0, ins)
            for allocated, size in rank.held.pop((ins.htask, ins.microbatch), []):
                rank.buffers.append((allocated, at, size, False))
        elif isinstance(ins, RecordEvent):
            at = max(rank.issue, rank.streams.get(ins.stream, 0.0))
            rank.events[ins.event] = at
            self.entry(rank, ins.stream, at, at, ins)
        elif isinstance(ins, WaitEvent):
            assert ins.event in rank.events, f"rank {rank.rank} waits for unrecorded event {ins.event!r}"
            at = max(rank.streams.get(ins.stream, 0.0), rank.events[ins.event])
            rank.streams[ins.stream] = at
            waited = rank.waited.setdefault(ins.stream, set())
            waited.add(ins.event)
            if runs_alone(ins.stream, waited, self.closing[rank.rank]):
                rank.alone.add(ins.stream)
            self.entry(rank, ins.stream, at, at, ins)
        elif isinstance(ins, Send):
            start = max(rank.issue, rank.streams.get(COMPUTE_STREAM, 0.0), rank.link)
            rank.link = start + costs.transfer_seconds(self.load(ins.htask, ins.microbatch))
            key = (rank.rank, ins.peer, ins.htask, ins.microbatch, ins.subgraph, ins.grad)
            self.messages.setdefault(key, deque()).append(rank.link)
            self.entry(rank, COMMUNICATION_STREAM, start, rank.link, ins)
        elif isinstance(ins, Recv):
            queue = self.messages.get((ins.peer, rank.rank, ins.htask, ins.microbatch, ins.subgraph, ins.grad))
            if not queue:
                return False
            ready = max(rank.issue, queue.popleft())
            self.block(rank, min(rank.idle(), ready), ready, ins)
            held = rank.held.setdefault((ins.htask, ins.microbatch), [])
            held.append((ready, costs.boundary_bytes(self.load(ins.htask, ins.microbatch))))
        elif isinstance(ins, AllReduce):
            return self.all_reduce(rank, ins)
        else:
            raise AssertionError(f"rank {rank.rank}: {ins.op.value} cannot appear in a round body")
        return True

    def block(self, rank: _Rank, start: float, end: float, ins: Instruction) -> None:
        """The rank's program waits (idle) from ``start`` until ``end``."""
        rank.exposed += end - start
        rank.issue = end
        self.entry(rank, COMMUNICATION_STREAM, start, end, ins)

    def all_reduce(self, rank: _Rank, ins: AllReduce) -> bool:
        group = tuple(sorted(ins.group))
        assert rank.rank in group, f"rank {rank.rank} all-reduces over {group}, which it is not part of"
        call = (group, rank.reduces.get(group, 0))
        arrived = self.arrivals.setdefault(call, {})
        arrived.setdefault(rank.rank, (rank.idle(), ins.tasks))
        if len(arrived) < len(group):
            return False
        assert all(tasks == ins.tasks for _, tasks in arrived.values()), f"all-reduce {call} of different tasks"
        start = max(arrived[r][0] for r in group)
        self.block(rank, arrived[rank.rank][0], start + self.costs.all_reduce_seconds(ins.tasks, len(group)), ins)
        rank.reduces[group] = call[1] + 1
        return True

    def peak_bytes(self, rank: _Rank) -> int:
        """Static bytes plus the largest live sum: at equal times, frees first, then
        allocations (the peak), then the end of transient loss buffers."""
        changes: list[tuple[float, int, int]] = []
        for allocated, released, size, transient in rank.buffers:
            if released > allocated or transient:
                changes += [(allocated, 1, size), (released, 2 if transient else 0, -size)]
        for key in sorted(rank.held):
            changes += [(allocated, 1, size) for allocated, size in rank.held[key]]
        live = peak = 0
        for _, _, delta in sorted(changes):
            live += delta
            peak = max(peak, live)
        return self.costs.static_bytes(rank.rank) + peak


def _streams(body: Sequence[Instruction]) -> set[int]:
    return {ins.stream for ins in body if isinstance(ins, (Forward, Backward, LossBackward))} or {COMPUTE_STREAM}


def simulate_phase(plan: Plan, phase: int, loads: Loads, costs: InstructionCosts) -> PhaseSimulation:
    """Replay one round of phase ``phase`` of ``plan`` (its partition, phases and rank programs;
    predictions are not read) with ``loads[(htask, microbatch)]`` on ``costs``. Raises
    ValueError if a micro-batch has no load and AssertionError if the programs deadlock."""
    replay = _Round(plan, phase, loads, costs)
    replay.run()
    ranks = replay.ranks
    per_body = plan.phases[phase].rounds_per_body
    seconds = max((r.finish() for r in ranks), default=0.0) / per_body
    busy = tuple(r.busy / per_body for r in ranks)
    bubble = 0.0
    if seconds > 0 and ranks:
        bubble = min(1.0, max(0.0, 1.0 - math.fsum(busy) / (len(ranks) * seconds)))
    return PhaseSimulation(
        phase=phase,
        seconds_per_round=seconds,
        busy_seconds=busy,
        bubble_fraction=bubble,
        exposed_communication_seconds=max((r.exposed for r in ranks), default=0.0) / per_body,
        peak_memory_bytes=tuple(replay.peak_bytes(r) for r in ranks),
        timeline=tuple(sorted(replay.timeline, key=lambda e: (e.rank, e.index))),
    )


def simulate_plan(plan: Plan, loads_by_phase: Sequence[Loads], costs: InstructionCosts) -> tuple[PhaseSimulation, ...]:
    """`simulate_phase` for every phase of ``plan`` (``loads_by_phase[i]`` for phase i)."""
    if len(loads_by_phase) != len(plan.phases):
        raise ValueError(f"{len(loads_by_phase)} phase loads for a plan of {len(plan.phases)} phases")
    return tuple(simulate_phase(plan, i, loads, costs) for i, loads in enumerate(loads_by_phase))
