"""Micro-batch layouts: which tokens of a packed buffer form which sequence and belong to which task.

A layout travels with its micro-batch as an argument of every forward call (like `cu_seqlens`),
never as shared state, so any number of micro-batches can be in flight at once (pipelines,
streams, recomputation) and each backward uses the layout its forward saw.

Legend: T tokens of the packed buffer, S sequences; `_S1` per sequence boundary (S + 1 entries);
N output rows.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (a micro-batch's ids, targets or row indices) on ``device``: on CUDA copied
    from pinned memory without waiting (the copy is ordered on the current stream); elsewhere
    the tensor itself."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class Segment:
    """The contiguous token range [start, end) of one task inside a packed micro-batch."""

    task: str
    start: int
    end: int


@dataclass(frozen=True, eq=False)
class MicroBatchLayout:
    """Sequence boundaries and task segments of one packed micro-batch of `num_tokens` tokens.

    `cu_seqlens_S1` is an int64 CPU tensor running from 0 to `num_tokens`: sequence i holds
    tokens `cu_seqlens_S1[i]:cu_seqlens_S1[i + 1]`. `segments` are sorted, disjoint and non-empty,
    one per task at most, and each covers whole sequences. Tokens outside every segment belong
    to no task: PEFT modules leave them to the frozen backbone.

    `output_rows`, when given, are the only rows whose final hidden states are read (training
    scores some tokens only): the backbone's last layer then works past attention on those rows
    alone (see `with_output_rows`). With `per_segment_operators`, frozen operator hosts run on
    each segment's rows apart, so that no task's rows share a product with another's: BLAS
    sums a handful of rows in another order than many, and the rows of a layout's output rows
    are often a handful.
    """

    cu_seqlens_S1: torch.Tensor
    segments: tuple[Segment, ...]
    num_tokens: int
    output_rows: OutputRows | None = None
    per_segment_operators: bool = False

    def __post_init__(self) -> None:
        cu = self.cu_seqlens_S1
        assert cu.dtype == torch.int64 and cu.dim() == 1 and cu.device.type == "cpu", (
            f"cu_seqlens_S1 must be a 1-D int64 CPU tensor, got {cu.dtype} {tuple(cu.shape)} on {cu.device}"
        )
        bounds = cu.tolist()
        assert bounds and bounds[0] == 0 and bounds[-1] == self.num_tokens, (
            f"cu_seqlens_S1 must run from 0 to num_tokens={self.num_tokens}, got {bounds[:3]}...{bounds[-1:]}"
        )
        assert all(a <= b for a, b in zip(bounds[:-1], bounds[1:])), f"cu_seqlens_S1 decreases: {bounds[:8]}..."
        boundaries = set(bounds)
        cursor = 0
        seen: set[str] = set()
        for seg in self.segments:
            assert seg.start >= cursor and seg.end > seg.start, f"bad segment order: {self.segments}"
            assert seg.task not in seen, f"task {seg.task} has two segments"
            assert seg.start in boundaries and seg.end in boundaries, f"{seg} does not cover whole sequences"
            seen.add(seg.task)
            cursor = seg.end
        assert cursor <= self.num_tokens, f"segments end at {cursor}, past num_tokens={self.num_tokens}"

    @classmethod
    def for_sequences(cls, seq_lens: Sequence[int], tasks: Sequence[str | None] | None = None) -> MicroBatchLayout:
        """Sequences of `seq_lens` tokens packed back to back; sequence i belongs to `tasks[i]`
        (None: to no task; default: every sequence to no task). A task's sequences must be adjacent."""
        tasks = [None] * len(seq_lens) if tasks is None else list(tasks)
        assert len(tasks) == len(seq_lens), f"{len(seq_lens)} sequences but {len(tasks)} owners"
        cu = [0]
        segments: list[Segment] = []
        for length, task in zip(seq_lens, tasks):
            assert length >= 0, f"negative sequence length {length}"
            start = cu[-1]
            cu.append(start + int(length))
            if task is None:
                continue
            if segments and segments[-1].task == task and segments[-1].end == start:
                segments[-1] = Segment(task, segments[-1].start, cu[-1])
            else:
                segments.append(Segment(task, start, cu[-1]))
        segments = [seg for seg in segments if seg.end > seg.start]
        return cls(torch.tensor(cu, dtype=torch.int64), tuple(segments), cu[-1])

    @classmethod
    def single_task(cls, task: str, num_tokens: int) -> MicroBatchLayout:
        """One sequence of `num_tokens` tokens, all of them `task`'s."""
        return cls.for_sequences([num_tokens], [task])

    def with_output_rows(self, rows: Sequence[int]) -> MicroBatchLayout:
        """This layout, declaring that only the buffer's ``rows`` (increasing) are read after the
        last layer. The rows form a layout of their own: sequence i keeps its rows that are
        listed (possibly none), each task's segment its own kept rows, and frozen operators run
        on each segment apart (a task's kept rows are few, and their products must not depend on
        other tasks' rows)."""
        assert all(a < b for a, b in zip(rows[:-1], rows[1:])), "output rows must increase"
        assert not rows or (rows[0] >= 0 and rows[-1] < self.num_tokens), f"output rows outside [0, {self.num_tokens})"
        kept_before = [bisect.bisect_left(rows, bound) for bound in self.cu_seqlens_S1.tolist()]
        segments = tuple(
            Segment(seg.task, bisect.bisect_left(rows, seg.start), bisect.bisect_left(rows, seg.end))
            for seg in self.segments
        )
        kept = MicroBatchLayout(
            torch.tensor(kept_before, dtype=torch.int64),
            tuple(seg for seg in segments if seg.end > seg.start),
            len(rows),
            per_segment_operators=True,
        )
        return dataclasses.replace(self, output_rows=OutputRows(torch.tensor(list(rows), dtype=torch.int64), kept))

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens_S1.shape[0]) - 1

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks present, in buffer order."""
        return tuple(seg.task for seg in self.segments)


@dataclass(frozen=True, eq=False)
class OutputRows:
    """The rows of a packed buffer whose final hidden states are read (``rows_N``: int64, CPU,
    increasing) and the layout of those rows alone (``layout``: sequence i and each task's
    segment keep their listed rows, in buffer order)."""

    rows_N: torch.Tensor
    layout: MicroBatchLayout
