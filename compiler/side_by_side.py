"""The streams pass's driver: which hTasks of each phase run side by side on one device's
streams (CPU lanes), with which joined tail, and over how many rounds per body
(`passes.streams` holds the rules; this module simulates the candidates they give and keeps the
fastest)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from muxtune.plans import Phase, Plan

from .cost.devices import planning_bytes
from .cost.model import CostModel
from .passes.align import checkpoint_rounds
from .passes.demand import TaskDemand
from .passes.emit import HTaskStreams, emit_programs
from .passes.simulate import PhaseSimulation
from .passes.streams import (
    MAX_ROUNDS_PER_BODY,
    best_tail,
    body_rounds_allowed,
    deal_streams,
    htask_seconds,
    keep_faster,
    schedule_rounds,
    stream_zero_microbatches,
)
from .predict import predictions


def side_by_side(
    draft: Plan,
    demands: list[dict[str, TaskDemand]],
    alone: tuple[PhaseSimulation, ...],
    cost: CostModel,
    ineffective: dict[str, float],
    num_streams: int,
    memory_limit: int,
) -> tuple[tuple[Phase, ...], list[HTaskStreams], list[int]] | None:
    """Each phase (with its rounds per body), its hTask streams and joined tail
    (`passes.streams`), or None when no phase gains from streams."""
    seconds = [htask_seconds(sim) for sim in alone]
    dealt = [
        deal_streams(each, num_streams) if len(phase.htasks) > 1 else {} for phase, each in zip(draft.phases, seconds)
    ]
    if not any(any(d.values()) for d in dealt):
        return None
    limit = planning_bytes(memory_limit)

    def simulate(
        phases: Sequence[Phase], streams: Sequence[HTaskStreams], tails: list[int]
    ) -> tuple[PhaseSimulation, ...]:
        programs = emit_programs(draft.tasks, phases, draft.partition, draft.placement, streams, tails)
        plan = dataclasses.replace(draft, phases=tuple(phases), programs=programs)
        return predictions(plan, demands, cost, ineffective)[1]

    trial = simulate(draft.phases, dealt, [0] * len(dealt))
    kept = [keep_faster(a, b, d, limit) for a, b, d in zip(alone, trial, dealt)]
    if not any(kept):
        return None
    counts = [stream_zero_microbatches(phase, streams) if streams else 0 for phase, streams in zip(draft.phases, kept)]
    candidates = {0: trial}
    for tail in range(1, max(counts) + 1):
        candidates[tail] = simulate(draft.phases, kept, [min(tail, c) for c in counts])
    tails = [best_tail({t: sims[i] for t, sims in candidates.items() if t <= c}, limit) for i, c in enumerate(counts)]
    phases, streams = list(draft.phases), list(kept)
    best = [candidates[tail][i].seconds_per_round for i, tail in enumerate(tails)]
    on_cpu = draft.placement.device == "cpu"
    for rounds in range(2, MAX_ROUNDS_PER_BODY + 1):
        longer = [dataclasses.replace(phase, rounds_per_body=rounds) for phase in draft.phases]
        trial_phases = [
            trial if kept[i] and on_cpu and body_rounds_allowed(trial, checkpoint_rounds(draft.tasks, phase)) else phase
            for i, (phase, trial) in enumerate(zip(draft.phases, longer))
        ]
        eligible = [i for i, phase in enumerate(trial_phases) if phase.rounds_per_body == rounds]
        if not eligible:
            continue
        schedules = [
            schedule_rounds(seconds[i], num_streams, rounds) if i in eligible else kept[i] for i in range(len(phases))
        ]
        sims = simulate(trial_phases, schedules, [0 if i in eligible else t for i, t in enumerate(tails)])
        for i in eligible:
            fits = max(sims[i].peak_memory_bytes, default=0) <= limit
            if fits and sims[i].seconds_per_round < best[i]:
                phases[i], streams[i], tails[i], best[i] = trial_phases[i], schedules[i], 0, sims[i].seconds_per_round
    return tuple(phases), streams, tails
