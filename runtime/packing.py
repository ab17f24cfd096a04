"""Packing whole sequences of several tasks into micro-batches (no padding between them).

Tensor suffixes: `_T` per token of the packed buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Example
from .layout import MicroBatchLayout

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MicroBatch:
    """A packed token buffer and its layout; each task's sequences are contiguous (one segment per task)."""

    input_ids_T: torch.Tensor
    position_ids_T: torch.Tensor
    targets_T: torch.Tensor  # next-token id scored at each position, IGNORE_INDEX elsewhere
    layout: MicroBatchLayout

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens


def build_microbatch(batch: list[tuple[str, Example]], *, scored_output_rows: bool = True) -> MicroBatch:
    """Pack `(task, example)` pairs, grouped by task in the given order, into one buffer; each
    sequence's position ids run from its `first_position`. With `scored_output_rows`, the
    layout's output rows are the scored ones (the last layer works on those alone past
    attention); without, the model's output covers every row."""
    input_ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    for _, example in batch:
        ids = example.input_ids
        input_ids.extend(ids)
        positions.extend(range(example.first_position, example.first_position + len(ids)))
        targets.extend(ids[i + 1] if example.is_target[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1))
        targets.append(IGNORE_INDEX)
    layout = MicroBatchLayout.for_sequences([len(e.input_ids) for _, e in batch], [task for task, _ in batch])
    if scored_output_rows:
        layout = layout.with_output_rows([row for row, target in enumerate(targets) if target != IGNORE_INDEX])
    return MicroBatch(
        input_ids_T=torch.tensor(input_ids, dtype=torch.long),
        position_ids_T=torch.tensor(positions, dtype=torch.long),
        targets_T=torch.tensor(targets, dtype=torch.long),
        layout=layout,
    )


def split_task_batch(examples: list[Example], token_budget: int) -> list[list[Example]]:
    """Greedy, order-preserving split of one task's global batch into pieces of at most
    `token_budget` tokens (a sequence longer than the budget forms a piece alone)."""
    pieces: list[list[Example]] = []
    used = 0
    for example in examples:
        length = len(example.input_ids)
        if not pieces or used + length > token_budget:
            pieces.append([])
            used = 0
        pieces[-1].append(example)
        used += length
    return pieces


def pack_microbatches(task_batches: dict[str, list[Example]], token_budgets: dict[str, int]) -> list[MicroBatch]:
    """Co-pack several tasks' global batches: micro-batch i holds piece i of every task.

    Each task's split depends on its own batch and budget only, so which tokens of a task
    share a micro-batch (and the order its gradients accumulate in) never depends on the
    other tasks: this is what keeps tasks bitwise isolated from each other.
    """
    pieces = {task: split_task_batch(batch, token_budgets[task]) for task, batch in task_batches.items()}
    return pack_pieces(pieces, max((len(p) for p in pieces.values()), default=0))


def pack_pieces(pieces: dict[str, list[list[Example]]], num_microbatches: int) -> list[MicroBatch]:
    """``num_microbatches`` micro-batches, micro-batch i holding piece i of every task (a task
    with fewer pieces brings nothing to the last ones)."""
    return [
        build_microbatch(
            [(task, e) for task, task_pieces in pieces.items() if i < len(task_pieces) for e in task_pieces[i]]
        )
        for i in range(num_microbatches)
    ]
