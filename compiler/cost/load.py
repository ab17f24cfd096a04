"""What one micro-batch carries, as the cost model sees it: per task, how many tokens, sequences
and target tokens, and the sum of squared sequence lengths (attention's cost)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class SegmentLoad:
    """One task's share of a micro-batch (averages over rounds may be fractional):
    ``squared_tokens`` is the sum over its sequences of length squared."""

    tokens: float
    sequences: float
    target_tokens: float
    squared_tokens: float

    def scaled(self, factor: float) -> SegmentLoad:
        """The same mix of sequences, ``factor`` times as many."""
        return SegmentLoad(
            self.tokens * factor,
            self.sequences * factor,
            self.target_tokens * factor,
            self.squared_tokens * factor,
        )


MicroBatchLoad = Mapping[str, SegmentLoad]
"""Task name -> its segment of the micro-batch (tasks without tokens may be absent)."""


def total_tokens(load: MicroBatchLoad) -> float:
    """Tokens of every task in the micro-batch."""
    return sum(segment.tokens for segment in load.values())
