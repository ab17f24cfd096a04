"""Unified PEFT representation: modules attached around frozen backbone operators.

Every PEFT method is a (dispatch, adapter, aggregate) triple around a base operator. The kinds
(DESIGN section 3) are listed in `AttachmentKind`. Operator-level kinds (parallel, serial, scale,
bias) share one host, `AnchoredOperator`, which runs the base operator once over the whole packed
micro-batch and lets each task's module adapt its own token segment. The prefix kinds attach to
attention and embedding hosts instead; they plug into the same segment table.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field

import torch
from torch import nn


class AttachmentKind(str, enum.Enum):
    """How a PEFT module combines with its anchor's frozen operator."""

    PARALLEL = "parallel"  # y = base(x) + delta(x)            (LoRA, rsLoRA, DoRA)
    SERIAL = "serial"  # y = h + f(h), h = base(x)              (bottleneck adapters)
    SCALE = "scale"  # y = base(x) * l                          ((IA)^3)
    BIAS = "bias"  # y = base(x) + b                            (BitFit-style)
    KV_PREFIX = "kv_prefix"  # learned K/V prepended per layer  (prefix tuning)
    INPUT_PREFIX = "input_prefix"  # learned soft tokens        (prompt tuning)


OPERATOR_KINDS = frozenset({AttachmentKind.PARALLEL, AttachmentKind.SERIAL, AttachmentKind.SCALE, AttachmentKind.BIAS})


@dataclass(frozen=True)
class Segment:
    """The contiguous token range [start, end) of one task inside a packed micro-batch."""

    task: str
    start: int
    end: int


@dataclass
class SegmentTable:
    """Which task owns which token range of the micro-batch being computed.

    One table is shared by every PEFT host of a model; the engine sets it before each forward
    pass. Segments are sorted, disjoint, and each task has at most one segment.
    """

    segments: tuple[Segment, ...] = field(default_factory=tuple)

    def set(self, segments: tuple[Segment, ...]) -> None:
        """Install the segments of the next micro-batch."""
        cursor = 0
        seen: set[str] = set()
        for seg in segments:
            assert seg.start >= cursor and seg.end > seg.start, f"bad segment order: {segments}"
            assert seg.task not in seen, f"task {seg.task} has two segments"
            seen.add(seg.task)
            cursor = seg.end
        self.segments = tuple(segments)


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


class AnchoredOperator(nn.Module):
    """A frozen base operator plus the operator-level PEFT modules of any number of tasks.

    The base runs once over all tokens; each task present in the segment table with a module
    here adapts its own segment. Tokens of tasks without a module at this anchor pass through.
    """

    def __init__(self, base: nn.Module, segment_table: SegmentTable) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self._segment_table = segment_table

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add_adapter(self, task: str, module: OperatorPeftModule) -> None:
        """Attach `task`'s module at this anchor."""
        assert module.kind in OPERATOR_KINDS, f"{module.kind} is not an operator-level kind"
        assert task not in self.adapters, f"task {task} already has a module here"
        self.adapters[task] = module

    def remove_adapter(self, task: str) -> None:
        """Detach `task`'s module (no-op when it has none here)."""
        if task in self.adapters:
            del self.adapters[task]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        segments = self._segment_table.segments
        if not any(s.task in self.adapters for s in segments):
            return y
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
        if cursor < y.shape[0]:
            sizes.append(y.shape[0] - cursor)
            owners.append(None)
        pieces = [
            piece_y if task is None else self.adapters[task].adapt(piece_x, piece_y)
            for task, piece_x, piece_y in zip(owners, x.split(sizes), y.split(sizes))
        ]
        return torch.cat(pieces, dim=0)
