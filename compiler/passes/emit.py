"""The emit pass: each rank's instruction program, one round body per phase.

A round runs the micro-batches of the phase's hTasks as one sequence (hTask 0's, then hTask
1's, ...: the phase's hTask order is the interleaving the planner chose), scheduled 1F1B across
the pipeline stages (`one_f_one_b`). A rank loads an hTask's global batches right before its
first micro-batch. Forward of a micro-batch on a stage: receive the activation from the previous
stage, run the stage's subgraphs forward, then on the last stage the loss, else send the
activation on. Backward: receive the gradient from the next stage (on the last stage the loss
made it), run the stage's subgraphs backward in reverse, send the gradient back, free the
micro-batch. A send or recv names the last subgraph before the stage boundary it crosses and
pairs ranks of the same tensor-parallel index and replica (rank numbering: `placement`).

After the micro-batches, data-parallel replicas all-reduce the active tasks' gradients over the
ranks of the same stage and tensor-parallel index; then every active task's optimizer step and
a checkpoint in the rounds the align pass marked. The tensor-parallel shards of a stage run
identical bodies (their collectives live inside the subgraphs).

Streams: every hTask's instructions run on the stream the planner gave it, in the order it gives
them (stream 0 and the phase's hTask order unless ``htask_streams`` says otherwise; only
one-stage programs use other streams, since sends and receives run on stream 0). Every other
stream first waits for an event stream 0 records at the start of the round (``round-start``:
after the previous round's optimizer steps), and before the all-reduce and the optimizer steps
stream 0 waits for an event each other stream records after its last hTask
(``stream-<s>-done``). Stream 0 may wait for them before its last micro-batches (``joined_tail``
of them): those then run alone on the device (`stream_checks.closing_events`), with all of a
CPU's threads.

A phase of several rounds per body (`Phase.rounds_per_body`, one rank only) names hTask instances
(`Phase.htask_of_instance`) and runs them in the order ``htask_streams`` gives, each on its
stream: load, its micro-batches, then its tasks' optimizer step on the same stream. An
instance whose hTask ran the round before on another stream first waits for the event that
stream records after that step (``htask-<i>-stepped``). Stream 0 joins the others at the end,
before the checkpoint.

On one rank this is, per micro-batch: every subgraph forward, the loss, every subgraph backward
in reverse order, free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from muxtune.plans import (
    AllReduce,
    Backward,
    BuildTasks,
    Checkpoint,
    ExportAdapters,
    Forward,
    Free,
    Instruction,
    LoadBackbone,
    LoadBatches,
    LossBackward,
    OptimizerStep,
    Partition,
    Phase,
    Placement,
    RankProgram,
    RecordEvent,
    Recv,
    Send,
    TaskPlan,
    WaitEvent,
)

from .align import checkpoint_rounds
from .placement import MeshPosition, position_of, rank_of

COMPUTE_STREAM = 0

Step = tuple[Literal["forward", "backward"], int]
"""One step of a pipeline schedule: the forward or backward of the i-th micro-batch."""

ROUND_START_EVENT = "round-start"
"""What stream 0 records first in a round whose hTasks run on several streams."""

HTaskStreams = Mapping[int, int]
"""The stream of each hTask of a phase (by hTask id), in the order the hTasks run (the named
ones first, then the others in hTask order); hTasks not named run on stream 0. For a phase of
several rounds per body: the stream of every hTask instance (`Phase.htask_of_instance`), in
the order they run."""


@dataclass(frozen=True)
class RankRole:
    """What a rank's round bodies depend on: its stage's subgraphs (in order), the last
    subgraph of the previous stage, its pipeline peers (None at either end), its data-parallel
    all-reduce group (empty without data parallelism) and the number of stages."""

    stage: int
    num_stages: int
    subgraphs: tuple[int, ...]
    cut_before: int | None
    previous: int | None
    next: int | None
    group: tuple[int, ...]


def one_f_one_b(num_microbatches: int, num_stages: int, stage: int) -> tuple[Step, ...]:
    """The 1F1B schedule of ``stage``: ``min(num_stages - stage - 1, num_microbatches)``
    warm-up forwards, then one forward and one backward in turn, then the remaining backwards."""
    warmup = min(num_stages - stage - 1, num_microbatches)
    steps: list[Step] = [("forward", i) for i in range(warmup)]
    for i in range(num_microbatches - warmup):
        steps += [("forward", warmup + i), ("backward", i)]
    steps += [("backward", i) for i in range(num_microbatches - warmup, num_microbatches)]
    return tuple(steps)


def stage_subgraphs(partition: Partition, num_stages: int) -> tuple[tuple[int, ...], ...]:
    """Each stage's subgraph ids, in order; ValueError unless every stage has some and the
    stages follow each other in execution order."""
    stages: list[list[int]] = [[] for _ in range(num_stages)]
    previous = 0
    for sub in partition.subgraphs:
        if not 0 <= sub.stage < num_stages:
            raise ValueError(f"subgraph {sub.id} is on stage {sub.stage}; the placement has {num_stages} stage(s)")
        if sub.stage < previous:
            raise ValueError(f"subgraph {sub.id} is on stage {sub.stage}, after a subgraph of stage {previous}")
        stages[sub.stage].append(sub.id)
        previous = sub.stage
    empty = [s for s, ids in enumerate(stages) if not ids]
    if empty:
        raise ValueError(f"stage(s) {empty} hold no subgraph of the partition")
    return tuple(tuple(ids) for ids in stages)


def rank_role(placement: Placement, stages: Sequence[Sequence[int]], rank: int) -> RankRole:
    """The role of ``rank`` in ``placement`` with ``stages`` (`stage_subgraphs`)."""
    where = position_of(placement, rank)
    s, num_stages = where.stage, placement.pipeline_parallel

    def peer(stage: int) -> int:
        return rank_of(placement, MeshPosition(stage, where.tp_index, where.replica))

    group: tuple[int, ...] = ()
    if placement.data_parallel > 1:
        group = tuple(rank_of(placement, MeshPosition(s, where.tp_index, r)) for r in range(placement.data_parallel))
    return RankRole(
        stage=s,
        num_stages=num_stages,
        subgraphs=tuple(stages[s]),
        cut_before=stages[s - 1][-1] if s > 0 else None,
        previous=peer(s - 1) if s > 0 else None,
        next=peer(s + 1) if s + 1 < num_stages else None,
        group=group,
    )


def _forward(role: RankRole, h: int, m: int, stream: int) -> list[Instruction]:
    out: list[Instruction] = []
    if role.previous is not None and role.cut_before is not None:
        out.append(Recv(h, m, role.cut_before, False, role.previous))
    out += [Forward(h, m, s, stream) for s in role.subgraphs]
    if role.next is None:
        out.append(LossBackward(h, m, stream))
    else:
        out.append(Send(h, m, role.subgraphs[-1], False, role.next))
    return out


def _backward(role: RankRole, h: int, m: int, stream: int) -> list[Instruction]:
    out: list[Instruction] = []
    if role.next is not None:
        out.append(Recv(h, m, role.subgraphs[-1], True, role.next))
    out += [Backward(h, m, s, stream) for s in reversed(role.subgraphs)]
    if role.previous is not None and role.cut_before is not None:
        out.append(Send(h, m, role.cut_before, True, role.previous))
    out.append(Free(h, m, stream))
    return out


def stepped_event(instance: int) -> str:
    """The event an hTask instance's stream records after its tasks' optimizer step."""
    return f"htask-{instance}-stepped"


def multi_round_body(
    phase: Phase, role: RankRole, tasks: Sequence[TaskPlan], instance_streams: HTaskStreams
) -> tuple[Instruction, ...]:
    """The body of a phase of several rounds per body on one rank: every hTask instance on its
    stream of ``instance_streams``, in that mapping's order (see the module docstring)."""
    if role.num_stages > 1 or role.group:
        raise ValueError("a body of several rounds runs on one rank")
    size = len(phase.htasks)
    others = sorted(set(instance_streams.values()) - {COMPUTE_STREAM})
    body: list[Instruction] = [RecordEvent(ROUND_START_EVENT, COMPUTE_STREAM)] if others else []
    body += [WaitEvent(ROUND_START_EVENT, stream) for stream in others]
    for instance, stream in instance_streams.items():
        htask = phase.htask_of_instance(instance)
        before, after = instance - size, instance + size
        if before >= 0 and instance_streams[before] != stream:
            body.append(WaitEvent(stepped_event(before), stream))
        body.append(LoadBatches(instance, stream))
        for kind, m in one_f_one_b(htask.num_microbatches, 1, 0):
            step = _forward if kind == "forward" else _backward
            body += step(role, instance, m, stream)
        body.append(OptimizerStep(tasks=htask.tasks, stream=stream))
        if after < phase.num_instances and instance_streams[after] != stream:
            body.append(RecordEvent(stepped_event(instance), stream))
    for stream in others:
        body += [RecordEvent(stream_done_event(stream), stream), WaitEvent(stream_done_event(stream), COMPUTE_STREAM)]
    rounds = checkpoint_rounds(tasks, phase)
    if rounds:
        body.append(Checkpoint(rounds=rounds))
    return tuple(body)


def stream_done_event(stream: int) -> str:
    """The event a stream records after its last hTask of the round."""
    return f"stream-{stream}-done"


def rank_round_body(
    phase: Phase,
    role: RankRole,
    tasks: Sequence[TaskPlan],
    htask_streams: HTaskStreams | None = None,
    joined_tail: int = 0,
) -> tuple[Instruction, ...]:
    """One round of ``phase`` on a rank playing ``role`` (see the module docstring); with other
    streams, stream 0's last ``joined_tail`` micro-batches come after it joins them."""
    if phase.rounds_per_body > 1:
        schedule = htask_streams or {i: COMPUTE_STREAM for i in range(phase.num_instances)}
        return multi_round_body(phase, role, tasks, schedule)
    streams = {h.id: (htask_streams or {}).get(h.id, COMPUTE_STREAM) for h in phase.htasks}
    if role.num_stages > 1 and any(streams.values()):
        raise ValueError("a pipeline stage runs every hTask on stream 0 (its sends and receives are on stream 0)")
    position = {h: k for k, h in enumerate(htask_streams or {})}
    ordered = sorted(phase.htasks, key=lambda h: position.get(h.id, len(position) + h.id))
    sequence = [(htask.id, m) for htask in ordered for m in range(htask.num_microbatches)]
    others = sorted(set(streams.values()) - {COMPUTE_STREAM})
    own = [i for i, (h, _) in enumerate(sequence) if streams[h] == COMPUTE_STREAM]
    tail = set(own[len(own) - joined_tail :]) if others and joined_tail > 0 else set()
    body: list[Instruction] = [RecordEvent(ROUND_START_EVENT, COMPUTE_STREAM)] if others else []
    body += [WaitEvent(ROUND_START_EVENT, stream) for stream in others]
    loaded: set[int] = set()
    steps = one_f_one_b(len(sequence), role.num_stages, role.stage)
    for after_join in (False, True):
        if after_join:
            for stream in others:
                body += [RecordEvent(stream_done_event(stream), stream)]
                body += [WaitEvent(stream_done_event(stream), COMPUTE_STREAM)]
        for kind, i in steps:
            if (i in tail) != after_join:
                continue
            h, m = sequence[i]
            if h not in loaded:
                body.append(LoadBatches(h, streams[h]))
                loaded.add(h)
            body += _forward(role, h, m, streams[h]) if kind == "forward" else _backward(role, h, m, streams[h])
    if role.group:
        body.append(AllReduce(tasks=phase.tasks, group=role.group))
    body.append(OptimizerStep(tasks=phase.tasks))
    rounds = checkpoint_rounds(tasks, phase)
    if rounds:
        body.append(Checkpoint(rounds=rounds))
    return tuple(body)


def _single_role(partition: Partition) -> RankRole:
    return RankRole(0, 1, tuple(s.id for s in partition.subgraphs), None, None, None, ())


def round_body(
    phase: Phase,
    partition: Partition,
    tasks: Sequence[TaskPlan],
    htask_streams: HTaskStreams | None = None,
    joined_tail: int = 0,
) -> tuple[Instruction, ...]:
    """One round of ``phase`` on a single rank holding every subgraph."""
    return rank_round_body(phase, _single_role(partition), tasks, htask_streams, joined_tail)


def _program(
    rank: int,
    role: RankRole,
    tasks: Sequence[TaskPlan],
    phases: Sequence[Phase],
    device: str,
    streams: Sequence[HTaskStreams] | None,
    tails: Sequence[int] | None,
) -> RankProgram:
    per_phase = streams if streams is not None else [None] * len(phases)
    phase_tails = tails if tails is not None else [0] * len(phases)
    return RankProgram(
        rank=rank,
        device=device,
        stage=role.stage,
        prologue=(LoadBackbone(stage=role.stage), BuildTasks(tasks=tuple(t.name for t in tasks))),
        phases=tuple(
            rank_round_body(phase, role, tasks, s, tail) for phase, s, tail in zip(phases, per_phase, phase_tails)
        ),
        epilogue=(ExportAdapters(),),
    )


def emit_programs(
    tasks: Sequence[TaskPlan],
    phases: Sequence[Phase],
    partition: Partition,
    placement: Placement,
    streams: Sequence[HTaskStreams] | None = None,
    tails: Sequence[int] | None = None,
) -> tuple[RankProgram, ...]:
    """One program per rank of ``placement``: load the rank's stage of the backbone and build
    every task, then the phases' rounds, then export the adapters. ``partition``'s subgraphs
    must name their stages (`plan_partition` with ``stage_of``), every stage holding some;
    ``streams`` gives each phase's hTask streams (all on stream 0 without it), ``tails`` each
    phase's ``joined_tail`` (`rank_round_body`; 0 without it)."""
    stages = stage_subgraphs(partition, placement.pipeline_parallel)
    return tuple(
        _program(rank, rank_role(placement, stages, rank), tasks, phases, placement.device, streams, tails)
        for rank in range(placement.num_ranks)
    )


def single_rank_program(
    tasks: Sequence[TaskPlan],
    phases: Sequence[Phase],
    partition: Partition,
    device: str,
    streams: Sequence[HTaskStreams] | None = None,
    tails: Sequence[int] | None = None,
) -> RankProgram:
    """Rank 0's program on one device holding every subgraph (`emit_programs` of a one-rank
    placement)."""
    return _program(0, _single_role(partition), tasks, phases, device, streams, tails)
