"""Causal attention over packed bf16 sequences on the CPU in one kernel call per layer and
direction (`cpu_attention.c`), with autograd.

Where it applies (`attention_kernel_applies`: CPU, bf16, an even head dim, the library built;
a sliding window included) the runtime's packed attention calls `packed_attention_bf16` instead of one
eager product pair, mask and softmax per sequence. Its numerics are flash attention's (scores
and softmax in fp32, weights rounded to bf16 for the product with v) rather than eager's (scores
rounded to bf16 first), so results differ from eager's by about one bf16 rounding. Only the
log-sum-exp of every query row is kept for the backward, which recomputes the weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .cpu_build import library
from .cpu_fused import split_costs

FLOPS_PER_THREAD = 1 << 21
"""Work (multiply-adds) per thread below which a call is not split among the intra-op threads."""


def attention_kernel_applies(q_THD: Tensor, k_THkvD: Tensor, v_THkvD: Tensor) -> bool:
    """Whether `packed_attention_bf16` covers these operands."""
    tensors = (q_THD, k_THkvD, v_THkvD)
    if any(t.device.type != "cpu" or t.dtype != torch.bfloat16 or t.dim() != 3 for t in tensors):
        return False
    heads, kv_heads, head_dim = q_THD.shape[1], k_THkvD.shape[1], q_THD.shape[2]
    return head_dim % 2 == 0 and heads % kv_heads == 0 and k_THkvD.shape[2] == head_dim and library() is not None


def _run_units(
    lengths: Sequence[int], kv_heads: int, head_dim: int, group: int, call: Callable[[int, int, int, int], None]
) -> None:
    """``call(begin, end, scratch, max_len)`` over unit ranges (unit = sequence x key/value head), split
    among the intra-op threads by the units' causal product sizes; each range gets its own scratch."""
    costs = [length * (length + 1) // 2 * head_dim * group for length in lengths for _ in range(kv_heads)]
    max_len = max(lengths, default=0)
    scratch_bytes = library().attention_scratch_bytes(max_len, head_dim)

    def with_scratch(begin: int, end: int) -> None:
        scratch = torch.empty(scratch_bytes, dtype=torch.uint8)
        call(begin, end, scratch.data_ptr(), max_len)

    split_costs(costs, FLOPS_PER_THREAD, with_scratch)


class _PackedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, lengths: tuple[int, ...], scale: float, window: int
    ) -> Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        tokens, heads, head_dim = q.shape
        kv_heads = k.shape[1]
        offsets = _offsets(lengths)
        out = torch.empty_like(q)
        lse = torch.empty(tokens, heads, dtype=torch.float32)
        kernel = library().attention_forward_bf16
        pointers = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), offsets.data_ptr())

        def call(begin: int, end: int, scratch: int, max_len: int) -> None:
            kernel(*pointers, begin, end, heads, kv_heads, head_dim, window, scale, scratch, max_len)

        _run_units(lengths, kv_heads, head_dim, heads // kv_heads, call)
        ctx.save_for_backward(q, k, v, lse, offsets)
        ctx.lengths, ctx.scale, ctx.window = lengths, scale, window
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None, None]:
        q, k, v, lse, offsets = ctx.saved_tensors
        dout = grad_out.to(torch.bfloat16).contiguous()
        heads, head_dim, kv_heads = q.shape[1], q.shape[2], k.shape[1]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        kernel = library().attention_backward_bf16
        pointers = (q, k, v, dout, lse, dq, dk, dv, offsets)
        addresses = tuple(t.data_ptr() for t in pointers)

        def call(begin: int, end: int, scratch: int, max_len: int) -> None:
            kernel(*addresses, begin, end, heads, kv_heads, head_dim, ctx.window, ctx.scale, scratch, max_len)

        _run_units(ctx.lengths, kv_heads, head_dim, heads // kv_heads, call)
        return dq, dk, dv, None, None, None


def _offsets(lengths: Sequence[int]) -> Tensor:
    """The sequences' cumulative offsets [S + 1], int64."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)


def packed_attention_bf16(
    q_THD: Tensor,
    k_THkvD: Tensor,
    v_THkvD: Tensor,
    lengths: Sequence[int],
    scale: float,
    sliding_window: int | None = None,
) -> Tensor:
    """Attention [T, H, D] causal within each packed sequence of `lengths` (summing to T), query
    head h reading key/value head h // (H / Hkv); with `sliding_window` W a token sees itself and
    the W - 1 tokens before it. Only where `attention_kernel_applies`."""
    window = 0 if sliding_window is None else int(sliding_window)
    return _PackedCausalAttention.apply(q_THD, k_THkvD, v_THkvD, tuple(lengths), float(scale), window)
