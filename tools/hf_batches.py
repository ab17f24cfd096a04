"""Right-padded batches and their loss, as a transformers + peft training loop sees them.

Shared by the benchmark baseline and the equivalence tests' reference run, so both compare
MuxTune's packed buffers against the same padded formulation (DESIGN section 8's loss: summed
target-token NLL over the global batch / number of target tokens).
"""

from __future__ import annotations

import torch

from muxtune.runtime.data import Example
from muxtune.runtime.packing import IGNORE_INDEX


def padded_batch(
    batch: list[Example], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) on ``device``, each [B, longest]; labels IGNORE_INDEX
    off target."""
    length = max(len(e.input_ids) for e in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n], mask[row, :n] = torch.tensor(e.input_ids), 1
        labels[row, :n] = torch.tensor([t if m else IGNORE_INDEX for t, m in zip(e.input_ids, e.is_target)])
    return ids.to(device), mask.to(device), labels.to(device)


def padded_batch_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL over target tokens / their number."""
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
    )
    return nll / (labels[:, 1:] != IGNORE_INDEX).sum()
