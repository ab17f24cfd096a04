"""Random segmented-LoRA cases, a naive per-task reference, and runners for the kernel backends.

Legend: T tokens, D in-features, O out-features, P slots.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from muxtune.kernels import LoraSlots, SegmentLayout, lora_dispatch, segmented_lora

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GRAD_NAMES = ("x", "A", "B", "base")


@dataclass(frozen=True)
class Case:
    """One segmented LoRA problem: layout, slot ranks and scalings, feature sizes."""

    segments: tuple[tuple[int, int, int], ...]
    num_tokens: int
    ranks: tuple[int, ...]
    scalings: tuple[float, ...]
    d_in: int
    d_out: int
    block_m: int = 16
    chunk_m: int = 32
    device: torch.device = DEVICE

    def layout(self) -> SegmentLayout:
        return SegmentLayout.build(
            self.segments, self.num_tokens, len(self.ranks), self.device, block_m=self.block_m, chunk_m=self.chunk_m
        )

    def slots(self) -> LoraSlots:
        return LoraSlots.build(self.ranks, self.scalings, self.device)


@st.composite
def cases(draw: st.DrawFn, max_tokens: int = 80, max_rank: int = 20, max_features: int = 40) -> Case:
    """Sorted segments with gaps, empty segments and repeated slots; ranks from 1 to `max_rank`."""
    num_slots = draw(st.integers(1, 4))
    ranks = tuple(draw(st.lists(st.integers(1, max_rank), min_size=num_slots, max_size=num_slots)))
    scalings = tuple(draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 16.0]), min_size=num_slots, max_size=num_slots)))
    num_tokens = draw(st.integers(0, max_tokens))
    cuts = sorted(draw(st.lists(st.integers(0, num_tokens), max_size=8)))
    bounds = [0, *cuts, num_tokens]
    segments = []
    for start, end in zip(bounds, bounds[1:]):
        slot = draw(st.integers(-1, num_slots - 1))  # -1: rows outside every segment
        if slot >= 0:
            segments.append((start, end, slot))
    d_in = draw(st.integers(1, max_features))
    d_out = draw(st.integers(1, max_features))
    return Case(tuple(segments), num_tokens, ranks, scalings, d_in, d_out)


@dataclass(frozen=True)
class Inputs:
    """Leaf tensors of one case (weights scaled so every output stays O(1))."""

    case: Case
    x_TD: torch.Tensor
    lora_A: tuple[torch.Tensor, ...]
    lora_B: tuple[torch.Tensor, ...]
    base_TO: torch.Tensor | None
    grad_TO: torch.Tensor

    def leaves(self) -> list[torch.Tensor]:
        return [self.x_TD, *self.lora_A, *self.lora_B] + ([self.base_TO] if self.base_TO is not None else [])

    def cast(self, dtype: torch.dtype) -> Inputs:
        """The same values in `dtype`, as new leaves."""

        def leaf(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dtype).requires_grad_()

        return Inputs(
            self.case,
            leaf(self.x_TD),
            tuple(leaf(a) for a in self.lora_A),
            tuple(leaf(b) for b in self.lora_B),
            None if self.base_TO is None else leaf(self.base_TO),
            self.grad_TO.to(dtype),
        )


def make_inputs(case: Case, dtype: torch.dtype, fused: bool, seed: int) -> Inputs:
    """Random inputs for `case`, drawn in fp32 and rounded to `dtype`."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        values = torch.randn(*shape, generator=gen) * scale
        return values.to(device=case.device, dtype=dtype).requires_grad_()

    return Inputs(
        case,
        rand(case.num_tokens, case.d_in),
        tuple(rand(r, case.d_in, scale=case.d_in**-0.5) for r in case.ranks),
        tuple(rand(case.d_out, r, scale=r**-0.5 / s) for r, s in zip(case.ranks, case.scalings)),
        rand(case.num_tokens, case.d_out) if fused else None,
        rand(case.num_tokens, case.d_out).detach(),
    )


def grads_by_name(inputs: Inputs, y_TO: torch.Tensor) -> dict[str, torch.Tensor]:
    """y plus the gradients of <y, grad_TO> by name (zeros where a leaf does not reach y)."""
    leaves = inputs.leaves()
    if y_TO.requires_grad:
        grads = torch.autograd.grad(y_TO, leaves, inputs.grad_TO, allow_unused=True)
    else:  # the naive computation of a call without segments or base touches no leaf
        grads = (None,) * len(leaves)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    num_slots = len(inputs.lora_A)
    out = {"y": y_TO.detach(), "x": grads[0]}
    out |= {f"A{p}": g for p, g in enumerate(grads[1 : 1 + num_slots])}
    out |= {f"B{p}": g for p, g in enumerate(grads[1 + num_slots : 1 + 2 * num_slots])}
    if inputs.base_TO is not None:
        out["base"] = grads[-1]
    return out


def naive(inputs: Inputs) -> dict[str, torch.Tensor]:
    """Independent computation: per segment, base + s * linear(linear(x, A_p), B_p), in fp32."""
    ref = inputs.cast(torch.float32)
    case = ref.case
    base = ref.base_TO if ref.base_TO is not None else torch.zeros(case.num_tokens, case.d_out, device=case.device)
    pieces, cursor = [base[:0]], 0
    for start, end, slot in case.segments:
        pieces.append(base[cursor:start])
        delta = F.linear(F.linear(ref.x_TD[start:end], ref.lora_A[slot]), ref.lora_B[slot])
        pieces.append(base[start:end] + case.scalings[slot] * delta)
        cursor = end
    pieces.append(base[cursor:])
    return grads_by_name(ref, torch.cat(pieces))


@contextmanager
def backend(name: str) -> Iterator[None]:
    """Force the dispatcher's backend for the duration of the block."""
    previous = lora_dispatch.BACKEND
    lora_dispatch.BACKEND = name
    try:
        yield
    finally:
        lora_dispatch.BACKEND = previous


def run_kernels(inputs: Inputs, name: str) -> dict[str, torch.Tensor]:
    """Forward and backward through `segmented_lora` on backend `name`."""
    case = inputs.case
    with backend(name):
        y_TO = segmented_lora(inputs.x_TD, inputs.lora_A, inputs.lora_B, case.layout(), case.slots(), inputs.base_TO)
        return grads_by_name(inputs, y_TO)


def assert_all_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float) -> None:
    """Every tensor within `rel` of the largest magnitude of its reference (plus dtype-free shape check)."""
    assert got.keys() == want.keys()
    for key, expected in want.items():
        actual = got[key].float()
        expected = expected.float()
        scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
        torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=lambda m: f"{key}: {m}")
