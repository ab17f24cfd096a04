"""Packing whole sequences of several tasks into micro-batches (no padding between them).

Tensor suffixes: `_T` per token of the packed buffer, `_S1` per sequence boundary (S + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Example
from .peft import Segment

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MicroBatch:
    """A packed token buffer; each task's sequences are contiguous (one segment per task)."""

    input_ids_T: torch.Tensor
    position_ids_T: torch.Tensor
    cu_seqlens_S1: torch.Tensor
    targets_T: torch.Tensor  # next-token id scored at each position, IGNORE_INDEX elsewhere
    segments: tuple[Segment, ...]
    example_indices: dict[str, tuple[int, ...]]  # dataset line numbers per task

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids_T.shape[0])


def build_microbatch(batch: list[tuple[str, Example]]) -> MicroBatch:
    """Pack `(task, example)` pairs, grouped by task in the given order, into one buffer."""
    input_ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    cu_seqlens = [0]
    segments: list[Segment] = []
    indices: dict[str, list[int]] = {}
    for task, example in batch:
        if not segments or segments[-1].task != task:
            assert task not in indices, f"task {task} sequences are not contiguous"
            segments.append(Segment(task, len(input_ids), len(input_ids)))
            indices[task] = []
        ids = example.input_ids
        input_ids.extend(ids)
        positions.extend(range(len(ids)))
        targets.extend(ids[i + 1] if example.is_target[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1))
        targets.append(IGNORE_INDEX)
        cu_seqlens.append(len(input_ids))
        segments[-1] = Segment(task, segments[-1].start, len(input_ids))
        indices[task].append(example.index)
    return MicroBatch(
        input_ids_T=torch.tensor(input_ids, dtype=torch.long),
        position_ids_T=torch.tensor(positions, dtype=torch.long),
        cu_seqlens_S1=torch.tensor(cu_seqlens, dtype=torch.long),
        targets_T=torch.tensor(targets, dtype=torch.long),
        segments=tuple(segments),
        example_indices={task: tuple(v) for task, v in indices.items()},
    )


def pack_microbatches(task_batches: dict[str, list[Example]], max_tokens: int) -> list[MicroBatch]:
    """Greedy, order-preserving packing under a token budget.

    Tasks are taken in the mapping's order and each task's examples in batch order; a
    micro-batch is closed when the next sequence would exceed `max_tokens` (a sequence longer
    than the budget travels alone).
    """
    microbatches: list[MicroBatch] = []
    current: list[tuple[str, Example]] = []
    used = 0
    for task, examples in task_batches.items():
        for example in examples:
            length = len(example.input_ids)
            if current and used + length > max_tokens:
                microbatches.append(build_microbatch(current))
                current, used = [], 0
            current.append((task, example))
            used += length
    if current:
        microbatches.append(build_microbatch(current))
    return microbatches
