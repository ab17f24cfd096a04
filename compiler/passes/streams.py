"""The streams pass: which hTasks of a phase run side by side on separate streams.

On a device that runs several hTask streams at once (`DeviceSpec.parallel_streams`: on a CPU,
one lane of intra-op threads each) the hTasks of a one-rank phase are dealt to streams largest
first, each to the stream with the least work so far (the LPT rule), by the time the
single-stream simulation gives each hTask. A phase keeps its streams only where the simulation
of the whole body with them (every instruction slowed by `concurrent_slowdown`) predicts a
shorter round within the memory limit; otherwise its hTasks stay on stream 0, one after
another. Where it keeps them, stream 0 joins the other streams before as many of its last
micro-batches as give the shortest simulated round (`best_tail`): when the other streams finish
first, those micro-batches run alone on the device instead of leaving it half idle. Each stream
runs its hTasks largest first, so the tail is cut from stream 0's smallest.

Lanes that meet after every round idle while the longest finishes, and one hTask too large to
share evenly leaves a gap no deal closes. A body of several rounds (`schedule_rounds`) lets a
lane start its hTasks' next round while another still runs this one: an hTask may run its
rounds on different streams, so the lanes' loads even out over the body. The compiler keeps
whichever of the two the simulation predicts faster.
"""

from __future__ import annotations

from collections.abc import Mapping

from muxtune.plans import Phase

from .emit import COMPUTE_STREAM, HTaskStreams
from .simulate import PhaseSimulation

MAX_ROUNDS_PER_BODY = 4
"""The most rounds a body of one phase may cover (`schedule_rounds`): two already even out most
lanes; more make longer bodies for little."""


def htask_seconds(simulation: PhaseSimulation) -> dict[int, float]:
    """Each hTask's compute time in a simulated round (the sum of its instructions' spans)."""
    seconds: dict[int, float] = {}
    for entry in simulation.timeline:
        if entry.htask is not None and entry.stream >= 0:
            seconds[entry.htask] = seconds.get(entry.htask, 0.0) + (entry.end - entry.start)
    return seconds


def deal_streams(seconds: Mapping[int, float], num_streams: int) -> dict[int, int]:
    """Each hTask's stream: largest first onto the least-loaded stream (ties: lower hTask id,
    lower stream), the largest hTask on stream 0; in that order, so that each stream runs its
    largest hTask first and stream 0's joined tail holds its smallest."""
    load = [0.0] * max(1, num_streams)
    streams: dict[int, int] = {}
    for htask in sorted(seconds, key=lambda h: (-seconds[h], h)):
        target = min(range(len(load)), key=lambda s: (load[s], s))
        streams[htask] = target
        load[target] += seconds[htask]
    return streams


def schedule_rounds(seconds: Mapping[int, float], num_streams: int, rounds: int) -> dict[int, int]:
    """Each hTask instance's stream over a body of ``rounds`` rounds (`Phase.rounds_per_body`;
    instance ``h + j * len(seconds)`` is hTask ``h`` in round ``j``), in the order the instances
    start: round by round, largest hTask first, each instance on the stream where it can start
    first, no earlier than its hTask's previous round ends (ties: the lower stream). The lanes
    then meet only at the body's end, not after every round."""
    size = len(seconds)
    free = [0.0] * max(1, num_streams)
    ends: dict[int, float] = {}
    starts: list[tuple[float, int, int]] = []
    for j in range(rounds):
        for htask in sorted(seconds, key=lambda h: (-seconds[h], h)):
            instance = htask + j * size
            ready = ends.get(instance - size, 0.0)
            stream = min(range(len(free)), key=lambda s: (max(free[s], ready), s))
            start = max(free[stream], ready)
            free[stream] = ends[instance] = start + seconds[htask]
            starts.append((start, stream, instance))
    return {instance: stream for _, stream, instance in sorted(starts)}


def body_rounds_allowed(phase: Phase, checkpoints: tuple[int, ...]) -> bool:
    """Whether ``phase`` can run its `Phase.rounds_per_body`: they divide its rounds and every
    checkpoint round ends a body."""
    return phase.num_rounds % phase.rounds_per_body == 0 and all(phase.ends_body(r) for r in checkpoints)


def keep_faster(
    alone: PhaseSimulation, side_by_side: PhaseSimulation, streams: HTaskStreams, memory_limit: int
) -> HTaskStreams:
    """``streams`` when the side-by-side round is predicted faster and fits ``memory_limit`` on
    every rank, else no streams (every hTask on stream 0)."""
    fits = max(side_by_side.peak_memory_bytes, default=0) <= memory_limit
    return streams if fits and side_by_side.seconds_per_round < alone.seconds_per_round else {}


def stream_zero_microbatches(phase: Phase, streams: HTaskStreams) -> int:
    """How many of the phase's micro-batches run on stream 0 under ``streams``."""
    return sum(h.num_microbatches for h in phase.htasks if streams.get(h.id, COMPUTE_STREAM) == COMPUTE_STREAM)


def best_tail(simulations: Mapping[int, PhaseSimulation], memory_limit: int) -> int:
    """The joined tail (stream 0's micro-batches after it joins the other streams) whose simulated
    round is shortest within ``memory_limit`` (ties: the shorter tail; 0 when none fits)."""
    fitting = [t for t, sim in simulations.items() if max(sim.peak_memory_bytes, default=0) <= memory_limit]
    return min(fitting, key=lambda t: (simulations[t].seconds_per_round, t), default=0)
