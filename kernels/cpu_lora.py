"""LoRA's six products for a bf16 backbone with fp32 adapters on the CPU, reading and writing
the bf16 activations directly (`cpu_lora.c`): the forward's shrink and its expansion added to
the host's output in one pass, and the backward's four products, with no fp32 copies of the
input, the host's output or either gradient.

The arithmetic is fp32 on exact widenings of the bf16 values, as peft's `x.to(fp32) @ A^T`
computes it; only the order of the sums differs from BLAS (a fixed order given the shapes), so
results may differ from torch's in the last bit of an fp32 sum and, rarely, by one bf16
rounding. A row's results never depend on other rows, and the weight gradients sum the rows in
order whatever the thread count, so fused and alone training stay equal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cpu_build import library
from .cpu_fused import row_at, split_rows

VECTOR_COLUMNS = 32
"""Column grain of `outer`'s thread split: each column's sum is then the same whichever thread runs it."""


def lora_kernels_apply(x: Tensor, y: Tensor, weight_A: Tensor, weight_B: Tensor) -> bool:
    """Whether `ParallelLora` runs on these kernels: CPU bf16 host output `y`, fp32 adapters, the
    library available. The input `x` is bf16, or fp32 where dropout made an fp32 copy of it (its
    two products then run on BLAS; the four that read or write bf16 run here)."""
    tensors = (x, y, weight_A, weight_B)
    if any(t.device.type != "cpu" for t in tensors) or x.dim() != 2 or y.dim() != 2:
        return False
    if x.dtype not in (torch.bfloat16, torch.float32) or y.dtype != torch.bfloat16:
        return False
    return weight_A.dtype == torch.float32 and weight_B.dtype == torch.float32 and library() is not None


def rows_dot(x_TK: Tensor, w_RK: Tensor, scale: float = 1.0) -> Tensor:
    """``scale * (x.float() @ w.T)`` [T, R] fp32, for bf16 x [T, K] and fp32 w [R, K]."""
    x, w = x_TK.contiguous(), w_RK.contiguous()
    rows, inner = x.shape
    rank = w.shape[0]
    out = torch.empty(rows, rank, dtype=torch.float32)
    kernel = library().lora_rows_dot_bf16

    def call(begin: int, end: int) -> None:
        kernel(row_at(x, begin, inner), w.data_ptr(), row_at(out, begin, rank), end - begin, inner, rank, scale)

    split_rows(rows, inner * rank // 8 + 1, call)
    return out


def expand(h_TR: Tensor, w_RN: Tensor, base_TN: Tensor | None, scale: float = 1.0) -> Tensor:
    """``(base.float() + scale * (h @ w)).to(bf16)`` [T, N] (without base: ``(scale * (h @ w))``),
    for fp32 h [T, R] and w [R, N] and a bf16 base [T, N]."""
    h, w = h_TR.contiguous(), w_RN.contiguous()
    base = base_TN.contiguous() if base_TN is not None else None
    rows, rank = h.shape
    width = w.shape[1]
    out = torch.empty(rows, width, dtype=torch.bfloat16)
    kernel = library().lora_expand_bf16

    def call(begin: int, end: int) -> None:
        base_at = row_at(base, begin, width) if base is not None else None
        out_at = row_at(out, begin, width)
        kernel(row_at(h, begin, rank), w.data_ptr(), base_at, out_at, end - begin, width, rank, scale)

    split_rows(rows, width * rank // 8 + 1, call)
    return out


def outer(x_TN: Tensor, h_TR: Tensor, scale: float = 1.0) -> Tensor:
    """``scale * (h.T @ x.float())`` [R, N] fp32, for bf16 x [T, N] and fp32 h [T, R]: each
    entry sums the rows in order."""
    x, h = x_TN.contiguous(), h_TR.contiguous()
    rows, width = x.shape
    rank = h.shape[1]
    out = torch.empty(rank, width, dtype=torch.float32)
    kernel = library().lora_outer_bf16

    def call(begin: int, end: int) -> None:
        kernel(x.data_ptr(), h.data_ptr(), out.data_ptr(), rows, width, rank, scale, begin, end)

    split_rows(width, rows * rank // 8 + 1, call, align=VECTOR_COLUMNS)
    return out
