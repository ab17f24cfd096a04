"""The align pass: phases, per-task token budgets and the exact micro-batch count of every
hTask in every phase.

Every dataset is tokenized and every batch order is seeded, so the compiler knows each task's
every global batch. A task takes one step per round from round 1 to its `steps`, so the set of
active tasks changes only when a task finishes: each run of rounds with one active set is a
phase. A task's budget and its split of each batch into pieces depend on the task alone (so a
task's result never depends on the other tasks); an hTask's micro-batch count in a phase is the
most pieces any of its tasks needs in any round of the phase.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from muxtune.plans import HTask, Phase, TaskPlan
from muxtune.runtime.data import TokenizedDataset, batch_indices
from muxtune.runtime.packing import split_task_batch

CHUNK_SIZE = 1


def mean_length(dataset: TokenizedDataset) -> float:
    """Mean token count of the usable examples."""
    usable = dataset.usable
    return sum(len(e.input_ids) for e in usable) / len(usable)


def token_budget(task: TaskPlan, dataset: TokenizedDataset, task_tokens: int) -> int:
    """At most `task_tokens` tokens of the task per micro-batch, never less than its longest
    sequence, never more than its expected global batch; a multiple of the chunk size."""
    longest = max(len(e.input_ids) for e in dataset.usable)
    expected_batch = math.ceil(mean_length(dataset) * task.batch_size)
    budget = max(longest, min(task_tokens, expected_batch))
    return CHUNK_SIZE * math.ceil(budget / CHUNK_SIZE)


def pieces_per_round(task: TaskPlan, dataset: TokenizedDataset, budget: int) -> list[int]:
    """How many micro-batch pieces each of the task's global batches splits into (step order)."""
    usable = dataset.usable
    stream = batch_indices(len(usable), task.batch_size, task.seed)
    counts = []
    for _ in range(task.steps):
        batch = [usable[i] for i in next(stream)]
        counts.append(len(split_task_batch(batch, budget)))
    return counts


def active_sets(tasks: Sequence[TaskPlan]) -> list[tuple[int, int, tuple[str, ...]]]:
    """(first round, number of rounds, active tasks in plan order) of each phase."""
    ends = sorted({t.steps for t in tasks})
    phases, first = [], 1
    for last in ends:
        active = tuple(t.name for t in tasks if t.steps >= last)
        phases.append((first, last - first + 1, active))
        first = last + 1
    return phases


def plan_phases(
    tasks: Sequence[TaskPlan],
    datasets: Mapping[str, TokenizedDataset],
    *,
    fuse: bool,
    task_tokens: int,
) -> tuple[Phase, ...]:
    """The job's phases: all active tasks in one hTask (``fuse``) or one hTask per task."""
    budgets = {t.name: token_budget(t, datasets[t.name], task_tokens) for t in tasks}
    pieces = {t.name: pieces_per_round(t, datasets[t.name], budgets[t.name]) for t in tasks}
    phases = []
    for index, (first, count, active) in enumerate(active_sets(tasks)):
        groups = [active] if fuse else [(name,) for name in active]
        htasks = []
        for htask_id, group in enumerate(groups):
            needed = max(max(pieces[name][first - 1 : first - 1 + count]) for name in group)
            htasks.append(
                HTask(
                    id=htask_id,
                    tasks=group,
                    micro_batch_tokens=sum(budgets[name] for name in group),
                    token_budgets=tuple(budgets[name] for name in group),
                    num_microbatches=needed,
                )
            )
        phases.append(Phase(id=index, first_round=first, num_rounds=count, tasks=active, htasks=tuple(htasks)))
    return tuple(phases)


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
