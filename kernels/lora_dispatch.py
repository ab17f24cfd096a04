"""Segmented multi-task LoRA with autograd, and the dispatcher between Triton and plain torch.

Shape legend and layouts: `lora_layout`. For each segment `[start, end)` of slot p this computes
peft's parallel LoRA on the already-dropped-out input (dropout stays with the caller):

    y[start:end] = base[start:end] + s_p * (x[start:end] @ A_p^T) @ B_p^T

Forward is two kernels (shrink, then expand fused with the base add); backward is four segmented
kernels: dh = s * g @ B (a shrink over B^T), dx = dh @ A (an expand over A^T), dA = dh^T x and
dB = s * g^T h (chunked weight-gradient reductions). Gradients flow to x, every A_p and B_p, and
the base output.

Backend choice: `BACKEND` if set, else the `MUXTUNE_LORA_BACKEND` environment variable, else
"auto": Triton for CUDA tensors, the torch reference elsewhere. "triton" forces Triton (on CPU
that needs `TRITON_INTERPRET=1` set before `lora_triton` is first imported); "torch" forces the
reference. Triton is imported only when first chosen.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, Literal

import torch

from muxtune.common.errors import UserError

from . import lora_reference
from .lora_layout import LoraSlots, SegmentLayout

Backend = Literal["auto", "triton", "torch"]
BACKEND: Backend | None = None
BACKEND_ENV = "MUXTUNE_LORA_BACKEND"


class BackendError(UserError):
    """A `MUXTUNE_LORA_BACKEND` value that names no backend."""


def configured_backend() -> Backend:
    """`BACKEND` if set, else the `MUXTUNE_LORA_BACKEND` environment variable, else "auto"."""
    choice = BACKEND or os.environ.get(BACKEND_ENV, "auto")
    if choice not in ("auto", "triton", "torch"):
        raise BackendError(f"{BACKEND_ENV} must be auto, triton or torch, got {choice!r}")
    return choice


def chosen_backend(x: torch.Tensor) -> Literal["triton", "torch"]:
    """The implementation `segmented_lora` uses for a call on `x`."""
    choice = configured_backend()
    if choice == "auto":
        return "triton" if x.is_cuda else "torch"
    return choice


def segmented_path(x: torch.Tensor) -> bool:
    """Whether PEFT hosts run all their LoRA segments as one `segmented_lora` call on input `x`:
    on CUDA, and wherever a backend is configured explicitly (the reference on the CPU in tests).
    Otherwise, on the CPU, each task's segment runs its own products (the runtime's
    `ParallelLora`: peft's rounding, and faster there than the reference's loop)."""
    return x.is_cuda or configured_backend() != "auto"


def _triton_ops() -> ModuleType:
    from . import lora_triton

    return lora_triton


def _ops(backend: str) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """(shrink, expand, weight_grad) of one backend."""
    if backend == "triton":
        mod = _triton_ops()
        return mod.lora_shrink_triton, mod.lora_expand_triton, mod.lora_weight_grad_triton
    return lora_reference.lora_shrink_ref, lora_reference.lora_expand_ref, lora_reference.lora_weight_grad_ref


def lora_shrink(
    x_TK: torch.Tensor, w_RK: torch.Tensor, layout: SegmentLayout, slots: LoraSlots, *, scale: bool = False
):
    """Dispatching `lora_shrink_ref` / `lora_shrink_triton` (no autograd)."""
    return _ops(chosen_backend(x_TK))[0](x_TK, w_RK, layout, slots, scale=scale)


def lora_expand(
    h_TM: torch.Tensor,
    w_NR: torch.Tensor,
    layout: SegmentLayout,
    slots: LoraSlots,
    *,
    base_TN: torch.Tensor | None = None,
    scale: bool = True,
) -> torch.Tensor:
    """Dispatching `lora_expand_ref` / `lora_expand_triton` (no autograd)."""
    return _ops(chosen_backend(h_TM))[1](h_TM, w_NR, layout, slots, base_TN=base_TN, scale=scale)


def lora_weight_grad(
    left_TM: torch.Tensor, right_TN: torch.Tensor, layout: SegmentLayout, slots: LoraSlots, *, scale: bool = False
) -> torch.Tensor:
    """Dispatching `lora_weight_grad_ref` / `lora_weight_grad_triton` (no autograd)."""
    return _ops(chosen_backend(left_TM))[2](left_TM, right_TN, layout, slots, scale=scale)


class SegmentedLoraFunction(torch.autograd.Function):
    """y = base + per-segment s_p * (x A_p^T) B_p^T over concatenated weights (see module doc)."""

    @staticmethod
    def forward(
        ctx: Any,
        x_TD: torch.Tensor,
        a_RD: torch.Tensor,
        b_OR: torch.Tensor,
        base_TO: torch.Tensor | None,
        layout: SegmentLayout,
        slots: LoraSlots,
        backend: str,
    ) -> torch.Tensor:
        shrink, expand, _ = _ops(backend)
        h_TM = shrink(x_TD, a_RD, layout, slots)
        y_TO = expand(h_TM, b_OR, layout, slots, base_TN=base_TO, scale=True)
        ctx.save_for_backward(x_TD, a_RD, b_OR, h_TM)
        ctx.layout, ctx.slots, ctx.backend = layout, slots, backend
        return y_TO

    @staticmethod
    def backward(ctx: Any, g_TO: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_TD, a_RD, b_OR, h_TM = ctx.saved_tensors
        layout, slots = ctx.layout, ctx.slots
        shrink, expand, weight_grad = _ops(ctx.backend)
        need_x, need_a, need_b, need_base = ctx.needs_input_grad[:4]
        dx = da = db = None
        if need_x or need_a:
            dh_TM = shrink(g_TO, b_OR.T, layout, slots, scale=True)
            if need_x:
                dx = expand(dh_TM, a_RD.T, layout, slots, scale=False).to(x_TD.dtype)
            if need_a:
                da = weight_grad(dh_TM, x_TD, layout, slots)
        if need_b:
            db = weight_grad(h_TM, g_TO, layout, slots, scale=True).T
        return dx, da, db, g_TO if need_base else None, None, None, None


def segmented_lora(
    x_TD: torch.Tensor,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    layout: SegmentLayout,
    slots: LoraSlots,
    base_TO: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-task LoRA over a packed buffer, differentiable in x, every A_p, B_p and the base.

    `lora_A[p]` is slot p's (r_p, D) `lora_A.weight`, `lora_B[p]` its (O, r_p) `lora_B.weight`;
    all weights share one dtype, which is the compute dtype (x is cast to it, as in peft). With
    `base_TO` the result is `base + delta` in the base's dtype (fused); without it, `delta` alone
    in the weights' dtype, zero on rows outside every segment. `x_TD` is the LoRA input after the
    caller's dropout; `base_TO` is the frozen operator's output on the undropped input. The fused
    sum is rounded once (peft rounds `s * delta` to the output dtype, then adds).
    """
    _check(x_TD, lora_A, lora_B, layout, slots, base_TO)
    a_RD = lora_A[0] if len(lora_A) == 1 else torch.cat(list(lora_A), dim=0)
    b_OR = lora_B[0] if len(lora_B) == 1 else torch.cat(list(lora_B), dim=1)
    return SegmentedLoraFunction.apply(x_TD, a_RD, b_OR, base_TO, layout, slots, chosen_backend(x_TD))


def _check(
    x_TD: torch.Tensor,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    layout: SegmentLayout,
    slots: LoraSlots,
    base_TO: torch.Tensor | None,
) -> None:
    """Shape, dtype and device agreement between the call's tensors and its tables (host metadata only)."""
    if x_TD.dim() != 2 or x_TD.shape[0] != layout.num_tokens:
        raise ValueError(f"x must be (T={layout.num_tokens}, D), got {tuple(x_TD.shape)}")
    if not (len(lora_A) == len(lora_B) == slots.num_slots == layout.num_slots):
        raise ValueError(
            f"{len(lora_A)} A and {len(lora_B)} B weights for {slots.num_slots} slots (layout has {layout.num_slots})"
        )
    num_in, num_out = x_TD.shape[1], lora_B[0].shape[0]
    for p, (a, b, rank) in enumerate(zip(lora_A, lora_B, slots.ranks)):
        if tuple(a.shape) != (rank, num_in) or tuple(b.shape) != (num_out, rank):
            raise ValueError(
                f"slot {p}: A {tuple(a.shape)} and B {tuple(b.shape)} do not match rank {rank}, D={num_in}, O={num_out}"
            )
        if a.dtype != lora_A[0].dtype or b.dtype != lora_A[0].dtype:
            raise ValueError(f"slot {p}: all LoRA weights must share one dtype, got {a.dtype} and {b.dtype}")
    if base_TO is not None and tuple(base_TO.shape) != (layout.num_tokens, num_out):
        raise ValueError(f"base must be ({layout.num_tokens}, {num_out}), got {tuple(base_TO.shape)}")
    devices = {t.device for t in (x_TD, *lora_A, *lora_B, layout.tile_starts, slots.rank_offsets_P1)}
    if base_TO is not None:
        devices.add(base_TO.device)
    if len(devices) != 1:
        raise ValueError(f"tensors and tables must share one device, got {sorted(map(str, devices))}")
