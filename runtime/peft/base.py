"""Unified PEFT representation: modules attached around frozen backbone operators.

Every PEFT method is a (dispatch, adapter, aggregate) triple around a base operator. The kinds
(DESIGN section 3) are listed in `AttachmentKind`. Operator-level kinds (parallel, serial, scale,
bias) attach to hosts (`PeftHost`): backbone operators that run once over the whole packed
micro-batch and let each task's module adapt its own token segment, as given by the micro-batch's
`MicroBatchLayout`. The prefix kinds attach to attention and embedding hosts instead and read the
same layout.

Legend: T tokens of the packed buffer, I input features, O output features of a host.
"""

from __future__ import annotations

import abc
import enum

import torch
from torch import nn

from ..layout import MicroBatchLayout


class AttachmentKind(str, enum.Enum):
    """How a PEFT module combines with its anchor's frozen operator."""

    PARALLEL = "parallel"  # y = base(x) + delta(x)            (LoRA, rsLoRA, DoRA)
    SERIAL = "serial"  # y = h + f(h), h = base(x)              (bottleneck adapters)
    SCALE = "scale"  # y = base(x) * l                          ((IA)^3)
    BIAS = "bias"  # y = base(x) + b                            (BitFit-style)
    KV_PREFIX = "kv_prefix"  # learned K/V prepended per layer  (prefix tuning)
    INPUT_PREFIX = "input_prefix"  # learned soft tokens        (prompt tuning)


OPERATOR_KINDS = frozenset({AttachmentKind.PARALLEL, AttachmentKind.SERIAL, AttachmentKind.SCALE, AttachmentKind.BIAS})


class OperatorPeftModule(nn.Module, abc.ABC):
    """A task's trainable part at one operator anchor.

    `adapt(x, y)` receives the operator's input `x` and the frozen operator's output `y` for the
    task's tokens only, and returns the adapted output for those tokens.
    """

    kind: AttachmentKind

    @abc.abstractmethod
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Initialize the trainable parameters, drawing randomness from `generator` only."""

    def set_dropout_generator(self, generator: torch.Generator) -> None:
        """Give the module its task's random stream (used by methods with dropout)."""
        self.dropout_generator = generator

    @abc.abstractmethod
    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return the adapted output for one task's segment."""


class PeftHost(nn.Module):
    """Mixin for a frozen backbone operator that hosts the operator-level PEFT modules of any
    number of tasks in its `adapters` ModuleDict (keyed by task).

    A host class (e.g. `HostLinear`) runs its frozen operator once over all tokens of the packed
    micro-batch and passes the result through `adapt_segments`, where each task of the
    micro-batch's layout with a module here adapts its own segment. Tokens of tasks without a
    module here, and tokens outside every segment, pass through.
    """

    adapters: nn.ModuleDict

    def add_adapter(self, task: str, module: OperatorPeftModule) -> None:
        """Attach `task`'s module at this anchor."""
        assert module.kind in OPERATOR_KINDS, f"{module.kind} is not an operator-level kind"
        assert task not in self.adapters, f"task {task} already has a module here"
        self.adapters[task] = module

    def remove_adapter(self, task: str) -> None:
        """Detach `task`'s module (no-op when it has none here)."""
        if task in self.adapters:
            del self.adapters[task]

    def adapt_segments(self, x_TI: torch.Tensor, y_TO: torch.Tensor, layout: MicroBatchLayout) -> torch.Tensor:
        """The frozen output `y_TO` of input `x_TI`, with each task's segment adapted by its module."""
        segments = layout.segments
        if not any(s.task in self.adapters for s in segments):
            return y_TO
        # Cut the buffer into [gap, segment, gap, segment, ..., tail] with torch.split: its
        # backward assembles each gradient once (slicing would add one full-size zero tensor
        # per segment).
        sizes, owners, cursor = [], [], 0
        for seg in segments:
            if seg.start > cursor:
                sizes.append(seg.start - cursor)
                owners.append(None)
            sizes.append(seg.end - seg.start)
            owners.append(seg.task if seg.task in self.adapters else None)
            cursor = seg.end
        if cursor < y_TO.shape[0]:
            sizes.append(y_TO.shape[0] - cursor)
            owners.append(None)
        pieces = [
            piece_y if task is None else self.adapters[task].adapt(piece_x, piece_y)
            for task, piece_x, piece_y in zip(owners, x_TI.split(sizes), y_TO.split(sizes))
        ]
        return torch.cat(pieces, dim=0)
