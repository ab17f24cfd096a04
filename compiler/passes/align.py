"""The align pass: phases, per-task token budgets and the exact micro-batch count of every
hTask in every phase.

Every dataset is tokenized and every batch order is seeded, so the compiler knows each task's
every global batch. A task takes one step per round from round 1 to its `steps`, so the set of
active tasks changes only when a task finishes: each run of rounds with one active set is a
phase. The solver gives each task of a phase a token budget (from the micro-batch count of its
hTask); a task's split of each batch into pieces depends on its batch and budget only, and an
hTask's micro-batch count in a phase is the most pieces any of its tasks needs in any round of
the phase.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from muxtune.plans import HTask, Phase, TaskPlan


def active_sets(tasks: Sequence[TaskPlan]) -> list[tuple[int, int, tuple[str, ...]]]:
    """(first round, number of rounds, active tasks in plan order) of each phase."""
    ends = sorted({t.steps for t in tasks})
    phases, first = [], 1
    for last in ends:
        active = tuple(t.name for t in tasks if t.steps >= last)
        phases.append((first, last - first + 1, active))
        first = last + 1
    return phases


def checkpoint_rounds(tasks: Sequence[TaskPlan], phase: Phase) -> tuple[int, ...]:
    """Rounds of the phase after which the job checkpoints: a task reached a multiple of its
    `save_every`, or took its last step."""
    by_name = {t.name: t for t in tasks}
    due = set()
    for name in phase.tasks:
        task = by_name[name]
        for round_index in range(phase.first_round, phase.last_round + 1):
            if round_index == task.steps or (task.save_every and round_index % task.save_every == 0):
                due.add(round_index)
    return tuple(sorted(due))


def fused_phase(
    index: int,
    first_round: int,
    num_rounds: int,
    active: tuple[str, ...],
    groups: Sequence[Sequence[str]],
    budgets: Mapping[str, int],
    pieces: Mapping[str, int],
    data_parallel: int = 1,
) -> Phase:
    """A phase whose hTasks are ``groups`` in this (interleaving) order: each task keeps its
    ``budgets`` entry; an hTask has as many micro-batches as its tasks' most ``pieces`` in any
    round of the phase (per data-parallel replica)."""
    order = {name: k for k, name in enumerate(active)}
    htasks = []
    for htask_id, group in enumerate(groups):
        members = tuple(sorted(group, key=order.__getitem__))
        htasks.append(
            HTask(
                id=htask_id,
                tasks=members,
                micro_batch_tokens=sum(budgets[name] for name in members),
                token_budgets=tuple(budgets[name] for name in members),
                num_microbatches=max(math.ceil(pieces[name] / data_parallel) for name in members),
            )
        )
    return Phase(id=index, first_round=first_round, num_rounds=num_rounds, tasks=active, htasks=tuple(htasks))
