"""Triton kernels for segmented multi-task LoRA (shrink, expand, weight gradients).

Same signatures and semantics as `lora_reference` (shape legend and layouts: `lora_layout`).
Row-parallel kernels (shrink, expand) run one program per (row tile, column block); a tile never
crosses a segment, so each program reads one slot's rank offset, rank and scaling. Weight
gradients reduce each (slot, chunk of rows) into an fp32 partial, then sum each slot's partials
in chunk order (deterministic). Every product accumulates in fp32. Weights are passed as strided
views, so `B_OR.T` serves as the weight of the backward shrink and `A_RD.T` of the backward
expand without copies.

Under `TRITON_INTERPRET=1` (CPU tests) operands are cast to fp32 right after loading, because the
interpreter's bf16 arithmetic is wrong; on a GPU 16-bit operands go to `tl.dot` as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .lora_layout import LoraSlots, SegmentLayout

INTERPRETED = bool(triton.knobs.runtime.interpret)


@dataclass(frozen=True)
class Blocks:
    """Launch block sizes (row tiles come from the layout's `block_m`)."""

    n: int = 64  # output features per program (expand, weight gradients)
    k: int = 64  # reduction step over features (shrink)
    max_r: int = 64  # largest rank block; wider ranks take several blocks
    num_warps: int = 4


BLOCKS = Blocks()


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b accumulating in fp32; operands (already in the compute dtype) go to fp32 first if asked."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a, b, acc)


@triton.jit
def _slot_of(task, rank_off_ptr):
    """First rank row and rank of a tile's slot (rank 0 for rows outside every segment)."""
    slot = tl.maximum(task, 0)
    first = tl.load(rank_off_ptr + slot)
    rank = tl.where(task >= 0, tl.load(rank_off_ptr + slot + 1) - first, 0)
    return slot, first, rank


@triton.jit
def _shrink_kernel(
    x_ptr, w_ptr, out_ptr, scale_ptr, rank_off_ptr, tile_start_ptr, tile_end_ptr, tile_slot_ptr,
    K, OUT_R,
    stride_xt, stride_xk, stride_wr, stride_wk, stride_ot, stride_or,
    HAS_SCALE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    slot, first, rank = _slot_of(tl.load(tile_slot_ptr + tile), rank_off_ptr)
    rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = r0 + tl.arange(0, BLOCK_R)
    row_ok = rows < end
    col_ok = cols < rank
    w_rows = (first + cols).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_stop = tl.where(r0 < rank, K, 0)
    for k0 in range(0, k_stop, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :] * stride_xk, row_ok[:, None] & k_ok[None, :], 0.0)
        w = tl.load(w_ptr + w_rows[:, None] * stride_wr + ks[None, :] * stride_wk, col_ok[:, None] & k_ok[None, :], 0.0)
        acc = _dot(x.to(w.dtype), tl.trans(w), acc, DOT_FP32, PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + slot)
    out = out_ptr + rows[:, None] * stride_ot + cols[None, :] * stride_or
    tl.store(out, acc.to(out_ptr.dtype.element_ty), row_ok[:, None] & (cols < OUT_R)[None, :])


@triton.jit
def _expand_kernel(
    h_ptr, w_ptr, base_ptr, out_ptr, scale_ptr, rank_off_ptr, tile_start_ptr, tile_end_ptr, tile_slot_ptr,
    N,
    stride_ht, stride_hr, stride_wn, stride_wr, stride_bt, stride_bn, stride_ot, stride_on,
    HAS_BASE: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    slot, first, rank = _slot_of(tl.load(tile_slot_ptr + tile), rank_off_ptr)
    rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < end
    n_ok = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_ok = rs < rank
        h = tl.load(h_ptr + rows[:, None] * stride_ht + rs[None, :] * stride_hr, row_ok[:, None] & r_ok[None, :], 0.0)
        w_cols = (first + rs).to(tl.int64)
        w = tl.load(w_ptr + ns[:, None] * stride_wn + w_cols[None, :] * stride_wr, n_ok[:, None] & r_ok[None, :], 0.0)
        acc = _dot(h.to(w.dtype), tl.trans(w), acc, DOT_FP32, PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + slot)
    mask = row_ok[:, None] & n_ok[None, :]
    if HAS_BASE:
        base = tl.load(base_ptr + rows[:, None] * stride_bt + ns[None, :] * stride_bn, mask, 0.0)
        acc = acc + base.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_ot + ns[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty), mask)


@triton.jit
def _weight_grad_partial_kernel(
    left_ptr, right_ptr, part_ptr, rank_off_ptr, chunk_start_ptr, chunk_end_ptr, chunk_slot_ptr,
    N,
    stride_lt, stride_lr, stride_rt, stride_rn, stride_pc, stride_pr, stride_pn,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    chunk = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r0 = tl.program_id(2) * BLOCK_R
    start = tl.load(chunk_start_ptr + chunk)
    end = tl.load(chunk_end_ptr + chunk)
    _, _, rank = _slot_of(tl.load(chunk_slot_ptr + chunk), rank_off_ptr)
    rs = r0 + tl.arange(0, BLOCK_R)
    r_ok = rs < rank
    n_ok = ns < N
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    m_stop = tl.where(r0 < rank, end, start)
    for m0 in range(start, m_stop, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < end
        left = tl.load(
            left_ptr + rows[:, None] * stride_lt + rs[None, :] * stride_lr, row_ok[:, None] & r_ok[None, :], 0.0
        )
        right = tl.load(
            right_ptr + rows[:, None] * stride_rt + ns[None, :] * stride_rn, row_ok[:, None] & n_ok[None, :], 0.0
        )
        acc = _dot(tl.trans(left), right.to(left.dtype), acc, DOT_FP32, PRECISION)
    part = part_ptr + chunk.to(tl.int64) * stride_pc + rs[:, None] * stride_pr + ns[None, :] * stride_pn
    tl.store(part, acc, r_ok[:, None] & n_ok[None, :])


@triton.jit
def _weight_grad_reduce_kernel(
    part_ptr, out_ptr, scale_ptr, rank_off_ptr, slot_chunk_off_ptr,
    N,
    stride_pc, stride_pr, stride_pn, stride_or, stride_on,
    HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    slot = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r0 = tl.program_id(2) * BLOCK_R
    _, first, rank = _slot_of(slot, rank_off_ptr)
    rs = r0 + tl.arange(0, BLOCK_R)
    mask = (rs < rank)[:, None] & (ns < N)[None, :]
    c_start = tl.load(slot_chunk_off_ptr + slot)
    c_stop = tl.where(r0 < rank, tl.load(slot_chunk_off_ptr + slot + 1), c_start)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    parts = part_ptr + c_start.to(tl.int64) * stride_pc + rs[:, None] * stride_pr + ns[None, :] * stride_pn
    for _ in range(c_start, c_stop):
        acc += tl.load(parts, mask, 0.0)
        parts += stride_pc
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + slot)
    out_rows = (first + rs).to(tl.int64)
    tl.store(out_ptr + out_rows[:, None] * stride_or + ns[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty), mask)


def _dot_mode(compute: torch.dtype) -> tuple[bool, str]:
    """(cast operands to fp32, fp32 input precision): fp32 products follow torch's TF32 switch."""
    tf32 = compute == torch.float32 and not INTERPRETED and torch.backends.cuda.matmul.allow_tf32
    return INTERPRETED or compute == torch.float32, "tf32" if tf32 else "ieee"


def _block_r(max_rank: int) -> int:
    return min(max(16, triton.next_power_of_2(max_rank)), max(16, BLOCKS.max_r))


def lora_shrink_triton(
    x_TK: torch.Tensor, w_RK: torch.Tensor, layout: SegmentLayout, slots: LoraSlots, *, scale: bool = False
) -> torch.Tensor:
    """h_TM[seg, :r_p] = x_TK[seg] @ W_p^T (times s_p if `scale`), W_p = w_RK[rank rows of p]; dtype of w."""
    num_tokens, num_k = x_TK.shape
    h_TM = torch.empty(num_tokens, slots.max_rank, dtype=w_RK.dtype, device=x_TK.device)
    if layout.num_tiles == 0:
        return h_TM
    block_r = _block_r(slots.max_rank)
    dot_fp32, precision = _dot_mode(w_RK.dtype)
    grid = (layout.num_tiles, triton.cdiv(slots.max_rank, block_r))
    _shrink_kernel[grid](
        x_TK, w_RK, h_TM, slots.scalings_P, slots.rank_offsets_P1,
        layout.tile_starts, layout.tile_ends, layout.tile_slots,
        num_k, slots.max_rank,
        x_TK.stride(0), x_TK.stride(1), w_RK.stride(0), w_RK.stride(1), h_TM.stride(0), h_TM.stride(1),
        HAS_SCALE=scale, DOT_FP32=dot_fp32, PRECISION=precision,
        BLOCK_M=layout.block_m, BLOCK_R=block_r, BLOCK_K=BLOCKS.k, num_warps=BLOCKS.num_warps,
    )  # fmt: skip
    return h_TM


def lora_expand_triton(
    h_TM: torch.Tensor,
    w_NR: torch.Tensor,
    layout: SegmentLayout,
    slots: LoraSlots,
    *,
    base_TN: torch.Tensor | None = None,
    scale: bool = True,
) -> torch.Tensor:
    """y_TN[seg] = base_TN[seg] + s_p * h_TM[seg, :r_p] @ W_p^T, W_p = w_NR[:, rank cols of p].

    Without `base_TN` the base is zero and the result has w's dtype; with it (the fused variant:
    one pass reads the base output and writes the sum), the result has the base's dtype and rows
    outside every segment equal the base.
    """
    num_tokens, num_n = h_TM.shape[0], w_NR.shape[0]
    out_dtype = w_NR.dtype if base_TN is None else base_TN.dtype
    y_TN = torch.empty(num_tokens, num_n, dtype=out_dtype, device=h_TM.device)
    if layout.num_tiles == 0 or num_n == 0:
        return y_TN
    base = y_TN if base_TN is None else base_TN
    dot_fp32, precision = _dot_mode(w_NR.dtype)
    grid = (layout.num_tiles, triton.cdiv(num_n, BLOCKS.n))
    _expand_kernel[grid](
        h_TM, w_NR, base, y_TN, slots.scalings_P, slots.rank_offsets_P1,
        layout.tile_starts, layout.tile_ends, layout.tile_slots,
        num_n,
        h_TM.stride(0), h_TM.stride(1), w_NR.stride(0), w_NR.stride(1),
        base.stride(0), base.stride(1), y_TN.stride(0), y_TN.stride(1),
        HAS_BASE=base_TN is not None, HAS_SCALE=scale, DOT_FP32=dot_fp32, PRECISION=precision,
        BLOCK_M=layout.block_m, BLOCK_N=BLOCKS.n, BLOCK_R=_block_r(slots.max_rank), num_warps=BLOCKS.num_warps,
    )  # fmt: skip
    return y_TN


def lora_weight_grad_triton(
    left_TM: torch.Tensor, right_TN: torch.Tensor, layout: SegmentLayout, slots: LoraSlots, *, scale: bool = False
) -> torch.Tensor:
    """g_RN[rank rows of p] = (s_p if `scale`) * sum over p's segments of left[seg, :r_p]^T @ right[seg].

    Slots without tokens get zeros. The result has left's dtype.
    """
    num_n = right_TN.shape[1]
    grad_RN = torch.empty(slots.total_rank, num_n, dtype=left_TM.dtype, device=left_TM.device)
    if num_n == 0:
        return grad_RN
    block_r = _block_r(slots.max_rank)
    r_blocks, n_blocks = triton.cdiv(slots.max_rank, block_r), triton.cdiv(num_n, BLOCKS.n)
    part_CMN = torch.empty(max(layout.num_chunks, 1), slots.max_rank, num_n, dtype=torch.float32, device=left_TM.device)
    if layout.num_chunks:
        dot_fp32, precision = _dot_mode(left_TM.dtype)
        _weight_grad_partial_kernel[(layout.num_chunks, n_blocks, r_blocks)](
            left_TM, right_TN, part_CMN, slots.rank_offsets_P1,
            layout.chunk_starts, layout.chunk_ends, layout.chunk_slots,
            num_n,
            left_TM.stride(0), left_TM.stride(1), right_TN.stride(0), right_TN.stride(1),
            part_CMN.stride(0), part_CMN.stride(1), part_CMN.stride(2),
            DOT_FP32=dot_fp32, PRECISION=precision,
            BLOCK_M=layout.block_m, BLOCK_R=block_r, BLOCK_N=BLOCKS.n, num_warps=BLOCKS.num_warps,
        )  # fmt: skip
    _weight_grad_reduce_kernel[(slots.num_slots, n_blocks, r_blocks)](
        part_CMN, grad_RN, slots.scalings_P, slots.rank_offsets_P1, layout.slot_chunk_offsets_P1,
        num_n,
        part_CMN.stride(0), part_CMN.stride(1), part_CMN.stride(2), grad_RN.stride(0), grad_RN.stride(1),
        HAS_SCALE=scale, BLOCK_R=block_r, BLOCK_N=BLOCKS.n, num_warps=BLOCKS.num_warps,
    )  # fmt: skip
    return grad_RN
