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


def uniform_init_(tensor: torch.Tensor, bound: float, generator: torch.Generator) -> None:
    """Fill `tensor` with U(-bound, bound) drawn in fp32 from `generator` (the task's own stream;
    torch's kaiming_uniform with a=sqrt(5) is `bound = 1 / sqrt(fan_in)`)."""
    with torch.no_grad():
        values = torch.rand(tensor.shape, generator=generator, dtype=torch.float32)
        tensor.copy_(values.mul_(2 * bound).sub_(bound))


class OperatorPeftModule(nn.Module, abc.ABC):
    """A task's trainable part at one operator anchor.

    `adapt(x, y, host)` receives the operator's input `x` and the frozen operator's output `y`
    for the task's tokens only (and the host, for methods that read its frozen weight), and
    returns the adapted output for those tokens. A module with `adapts_input` also rescales the
    operator's input first (`adapt_input`), before the frozen operator runs.
    """

    kind: AttachmentKind
    adapts_input: bool = False

    @abc.abstractmethod
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Initialize the trainable parameters, drawing randomness from `generator` only."""

    def set_dropout_generator(self, generator: torch.Generator) -> None:
        """Give the module its task's random stream (used by methods with dropout)."""
        self.dropout_generator = generator

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        """The operator's input for the task's tokens, adapted (identity unless `adapts_input`)."""
        return x

    @abc.abstractmethod
    def adapt(self, x: torch.Tensor, y: torch.Tensor, host: nn.Module) -> torch.Tensor:
        """Return the adapted output for one task's segment."""

    @classmethod
    def adapt_pieces(
        cls, x_TI: torch.Tensor, y_TO: torch.Tensor, sizes: list[int], modules: list[OperatorPeftModule | None]
    ) -> torch.Tensor | None:
        """Every piece of a host's buffer adapted in one call, when all its modules are of this
        class and the class has such a call for them here: piece i (``sizes[i]`` rows of the
        operator's input `x_TI` and output `y_TO`) adapted by ``modules[i]`` (None: passed
        through). None: adapt piece by piece (`adapt`)."""
        return None

    def shard_dims(self, style: str) -> dict[str, int | None] | None:
        """How the module splits at a ``style`` ("column" or "row") tensor-parallel host: per
        parameter name, the dimension split over the shards, or None for a parameter every shard
        holds whole whose gradient is a partial sum (see `muxtune.runtime.sharding`). None: the
        method has no tensor-parallel form there."""
        return None


class PeftHost(nn.Module):
    """Mixin for a frozen backbone module that hosts the PEFT modules of any number of tasks in
    its `adapters` ModuleDict (keyed by task); `accepted_kinds` are the attachment kinds it runs."""

    adapters: nn.ModuleDict
    accepted_kinds: frozenset[AttachmentKind] = OPERATOR_KINDS

    def add_adapter(self, task: str, module: nn.Module) -> None:
        """Attach `task`'s module here."""
        kind = getattr(module, "kind", None)
        assert kind in self.accepted_kinds, f"{type(self).__name__} does not host {kind} modules"
        assert task not in self.adapters, f"task {task} already has a module here"
        self.adapters[task] = module

    def remove_adapter(self, task: str) -> None:
        """Detach `task`'s module (no-op when it has none here)."""
        if task in self.adapters:
            del self.adapters[task]

    def segment_pieces(self, layout: MicroBatchLayout, num_tokens: int) -> tuple[list[int], list[str | None]]:
        """The buffer cut into [gap, segment, gap, segment, ..., tail]: piece sizes and, per piece,
        the task whose module here adapts it (None: pass through)."""
        sizes: list[int] = []
        owners: list[str | None] = []
        cursor = 0
        for seg in layout.segments:
            if seg.start > cursor:
                sizes.append(seg.start - cursor)
                owners.append(None)
            sizes.append(seg.end - seg.start)
            owners.append(seg.task if seg.task in self.adapters else None)
            cursor = seg.end
        if cursor < num_tokens:
            sizes.append(num_tokens - cursor)
            owners.append(None)
        return sizes, owners


class OperatorHost(PeftHost):
    """A frozen operator (`base_forward`) that runs once over all tokens of the packed
    micro-batch; each task of the micro-batch's layout with a module here adapts its own
    segment. Tokens of tasks without a module here, and tokens outside every segment, pass
    through. Pieces are cut with torch.split, whose backward assembles each gradient once
    (slicing would add one full-size zero tensor per segment)."""

    @abc.abstractmethod
    def base_forward(self, x_TI: torch.Tensor) -> torch.Tensor:
        """The frozen operator over a token buffer."""

    def adapted_forward(self, x_TI: torch.Tensor, layout: MicroBatchLayout) -> torch.Tensor:
        """The frozen operator of `x_TI`, each task's segment adapted by its module (all at once
        where the modules' class can, `adapt_pieces`; with the layout's `per_segment_operators`,
        each piece through the operator apart)."""
        adapted = any(seg.task in self.adapters for seg in layout.segments)
        if not (adapted or layout.per_segment_operators) or x_TI.shape[0] == 0:
            return self.base_forward(x_TI)
        sizes, owners = self.segment_pieces(layout, x_TI.shape[0])
        modules = [None if task is None else self.adapters[task] for task in owners]
        pieces_x = x_TI.split(sizes)
        adapts_input = any(m is not None and m.adapts_input for m in modules)
        if adapts_input:
            pieces_x = [x if m is None else m.adapt_input(x) for m, x in zip(modules, pieces_x)]
        if layout.per_segment_operators:
            pieces_y = [self.base_forward(x) for x in pieces_x]
        else:
            x_TI = torch.cat(pieces_x, dim=0) if adapts_input else x_TI
            y_TO = self.base_forward(x_TI)
            classes = {type(m) for m in modules if m is not None}
            adapted_TO = classes.pop().adapt_pieces(x_TI, y_TO, sizes, modules) if len(classes) == 1 else None
            if adapted_TO is not None:
                return adapted_TO
            pieces_y = y_TO.split(sizes)
        pieces = [y if m is None else m.adapt(x, y, self) for m, x, y in zip(modules, pieces_x, pieces_y)]
        return torch.cat(pieces, dim=0) if len(pieces) != 1 else pieces[0]


class KVPrefixModule(nn.Module, abc.ABC):
    """A task's learned keys and values at one attention host (`AttachmentKind.KV_PREFIX`): every
    query of each of the task's sequences also attends to them, before the sequence's own keys."""

    kind = AttachmentKind.KV_PREFIX

    @abc.abstractmethod
    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix keys and values, each [P, Hkv, D]."""


class InputPrefixModule(nn.Module, abc.ABC):
    """A task's learned soft tokens at the token embedding host (`AttachmentKind.INPUT_PREFIX`):
    they replace the embeddings of the first P (placeholder) tokens of each of the task's sequences."""

    kind = AttachmentKind.INPUT_PREFIX

    @abc.abstractmethod
    def soft_tokens(self) -> torch.Tensor:
        """The soft token embeddings [P, E]."""
