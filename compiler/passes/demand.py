"""What each task brings to a phase, from its real batches: the global batches of the phase's
rounds, their mean load, and the smallest token budget that splits every one of them into at
most k pieces (what the solver trades micro-batch count against memory with)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from muxtune.plans import TaskPlan
from muxtune.runtime.data import Example, TokenizedDataset, batch_indices
from muxtune.runtime.packing import split_task_batch

from ..cost.load import SegmentLoad


def segment_load(examples: Sequence[Example]) -> SegmentLoad:
    """The load of these sequences as one segment."""
    return SegmentLoad(
        tokens=float(sum(len(e.input_ids) for e in examples)),
        sequences=float(len(examples)),
        target_tokens=float(sum(e.num_targets for e in examples)),
        squared_tokens=float(sum(len(e.input_ids) ** 2 for e in examples)),
    )


def mean_load(loads: Sequence[SegmentLoad]) -> SegmentLoad:
    """The average of several loads (zero for none)."""
    if not loads:
        return SegmentLoad(0.0, 0.0, 0.0, 0.0)
    count = len(loads)
    return SegmentLoad(
        sum(x.tokens for x in loads) / count,
        sum(x.sequences for x in loads) / count,
        sum(x.target_tokens for x in loads) / count,
        sum(x.squared_tokens for x in loads) / count,
    )


def global_batches(task: TaskPlan, dataset: TokenizedDataset) -> list[list[Example]]:
    """The task's global batch of every step, in step order (the executor draws the same)."""
    usable = dataset.usable
    stream = batch_indices(len(usable), task.batch_size, task.seed)
    return [[usable[i] for i in next(stream)] for _ in range(task.steps)]


@dataclass(frozen=True)
class TaskDemand:
    """One task in one phase: its batches (one per round of the phase), their mean load, its
    longest sequence, and the chunk size budgets are multiples of."""

    name: str
    batches: tuple[tuple[Example, ...], ...]
    round_load: SegmentLoad
    longest: int
    chunk: int

    @classmethod
    def of(cls, name: str, batches: Sequence[Sequence[Example]], chunk: int) -> TaskDemand:
        """The demand of these rounds' batches."""
        return cls(
            name=name,
            batches=tuple(tuple(b) for b in batches),
            round_load=mean_load([segment_load(b) for b in batches]),
            longest=max(len(e.input_ids) for b in batches for e in b),
            chunk=chunk,
        )

    def _round_up(self, tokens: int) -> int:
        return self.chunk * math.ceil(tokens / self.chunk)

    def pieces(self, budget: int) -> int:
        """The most pieces any of the phase's batches splits into under ``budget``."""
        return max(len(split_task_batch(list(b), budget)) for b in self.batches)

    def budget_for(self, pieces: int) -> int:
        """The smallest budget (a chunk multiple, at least the longest sequence) that splits
        every batch of the phase into at most ``pieces`` pieces."""
        low = self._round_up(self.longest)
        high = self._round_up(max(sum(len(e.input_ids) for e in b) for b in self.batches))
        if self.pieces(low) <= pieces:
            return low
        while high - low > self.chunk:
            middle = self._round_up((low + high) // 2)
            if middle >= high:
                break
            if self.pieces(middle) <= pieces:
                high = middle
            else:
                low = middle
        return high

    def piece_load(self, pieces: int) -> SegmentLoad:
        """The mean load of one of ``pieces`` equal shares of a round's batch."""
        return self.round_load.scaled(1.0 / pieces)
