"""Inverted dropout with a mask that is a pure function of one seed: element i of a tensor is kept
when the top 24 bits of splitmix64(seed + (i + 1) * golden) reach the drop probability times
2^24 (rounded up).

A task draws one seed per call from its own generator (`draw_seed`), so its masks never depend
on other tasks and come back with the generator's checkpointed state; the mask itself costs no
generator draws per element (a CPU generator's `torch.rand` takes ~4 ns an element, more than
LoRA's products on the same rows) and is never stored: backward computes it again. On the CPU,
for bf16 or fp32 inputs and an fp32 result, one kernel pass (`cpu_fused.c`) casts, masks and
scales forward and masks, scales and casts back backward; elsewhere `keep_mask` builds the same
mask with torch's integer operators.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .cpu_build import library
from .cpu_fused import SUFFIXES, row_at, split_rows

RESOLUTION_BITS = 24
GOLDEN = 0x9E3779B97F4A7C15
MIX_1 = 0xBF58476D1CE4E5B9
MIX_2 = 0x94D049BB133111EB
SEED_BOUND = 1 << 62
CHUNK = 1 << 12
"""Elements per row of the flat view the kernels split among threads."""


def draw_seed(generator: torch.Generator) -> int:
    """One dropout seed from a task's generator (advancing it by one draw)."""
    return int(torch.randint(0, SEED_BOUND, (), generator=generator, device=generator.device))


def drop_threshold(p: float) -> int:
    """The drop probability on the mask's grid: elements whose 24 bits fall below it are dropped."""
    return math.ceil(p * (1 << RESOLUTION_BITS))


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 values (torch's `>>` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def keep_mask(shape: torch.Size | tuple[int, ...], seed: int, p: float, device: torch.device) -> Tensor:
    """The boolean keep mask of a tensor of `shape` under `seed` (int64 products wrap, as the
    kernel's uint64 ones do)."""
    index = torch.arange(1, math.prod(shape) + 1, dtype=torch.int64, device=device)
    z = index * _signed(GOLDEN) + _signed(seed)
    z = (z ^ _shift_right(z, 30)) * _signed(MIX_1)
    z = (z ^ _shift_right(z, 27)) * _signed(MIX_2)
    z = z ^ _shift_right(z, 31)
    return (_shift_right(z, 64 - RESOLUTION_BITS) >= drop_threshold(p)).view(shape)


def _run(name: str, dtype: torch.dtype, source: Tensor, target: Tensor, seed: int, p: float) -> None:
    kernel = getattr(library(), f"{name}_{SUFFIXES[dtype]}")
    count, threshold, q = source.numel(), drop_threshold(p), 1.0 - p

    def call(begin: int, end: int) -> None:
        first, last = begin * CHUNK, min(count, end * CHUNK)
        kernel(row_at(source, begin, CHUNK), row_at(target, begin, CHUNK), last - first, first, seed, threshold, q)

    split_rows(-(-count // CHUNK), CHUNK, call)


class _DropoutToFloat(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, p: float, seed: int) -> Tensor:
        source = x.contiguous()
        out = torch.empty(x.shape, dtype=torch.float32)
        _run("dropout_forward", x.dtype, source, out, seed, p)
        ctx.p, ctx.seed, ctx.dtype = p, seed, x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        grad = grad_out.to(torch.float32).contiguous()
        grad_x = torch.empty(grad.shape, dtype=ctx.dtype)
        _run("dropout_backward", ctx.dtype, grad, grad_x, ctx.seed, ctx.p)
        return grad_x, None, None


def seeded_dropout(x: Tensor, p: float, seed: int, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype) * keep / (1 - p)`` with the keep mask of `seed` (`keep_mask`), and its
    gradient; one kernel pass each way on the CPU for bf16 or fp32 `x` and an fp32 result."""
    if (
        dtype == torch.float32
        and x.device.type == "cpu"
        and x.dtype in SUFFIXES
        and x.numel() > 0
        and library() is not None
    ):
        return _DropoutToFloat.apply(x, p, seed)
    keep = keep_mask(x.shape, seed, p, x.device)
    return x.to(dtype) * keep.to(dtype) / (1.0 - p)
