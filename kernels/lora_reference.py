"""Plain-torch references for the segmented LoRA kernels: a loop over segments with torch matmuls.

Same signatures and semantics as `lora_triton` (see `lora_layout` for the shape legend and the
weight and h layouts); this is also the path that runs on CPU. Only host values of the layout and
slot tables are read, so it never synchronizes with a device. Matmuls run in the weights' dtype
(activations are cast to it first, as peft's LoRA does); results are cast to the output dtype.
"""

from __future__ import annotations

import torch

from .lora_layout import LoraSlots, SegmentLayout


def lora_shrink_ref(
    x_TK: torch.Tensor, w_RK: torch.Tensor, layout: SegmentLayout, slots: LoraSlots, *, scale: bool = False
) -> torch.Tensor:
    """h_TM[seg, :r_p] = x_TK[seg] @ W_p^T (times s_p if `scale`), W_p = w_RK[rank rows of p]; dtype of w."""
    h_TM = torch.zeros(x_TK.shape[0], slots.max_rank, dtype=w_RK.dtype, device=x_TK.device)
    for start, end, slot in layout.segments:
        if start == end:
            continue
        offset, rank = slots.rank_offset(slot), slots.ranks[slot]
        h = x_TK[start:end].to(w_RK.dtype) @ w_RK[offset : offset + rank].T
        h_TM[start:end, :rank] = h * slots.scalings[slot] if scale else h
    return h_TM


def lora_expand_ref(
    h_TM: torch.Tensor,
    w_NR: torch.Tensor,
    layout: SegmentLayout,
    slots: LoraSlots,
    *,
    base_TN: torch.Tensor | None = None,
    scale: bool = True,
) -> torch.Tensor:
    """y_TN[seg] = base_TN[seg] + s_p * h_TM[seg, :r_p] @ W_p^T, W_p = w_NR[:, rank cols of p].

    Without `base_TN` the base is zero and the result has w's dtype; with it, the result has the
    base's dtype and rows outside every segment equal the base.
    """
    num_tokens, num_out = h_TM.shape[0], w_NR.shape[0]
    if base_TN is None:
        y_TN = torch.zeros(num_tokens, num_out, dtype=w_NR.dtype, device=h_TM.device)
    else:
        y_TN = base_TN.clone()
    for start, end, slot in layout.segments:
        if start == end:
            continue
        offset, rank = slots.rank_offset(slot), slots.ranks[slot]
        delta = h_TM[start:end, :rank].to(w_NR.dtype) @ w_NR[:, offset : offset + rank].T
        if scale:
            delta = delta * slots.scalings[slot]
        if base_TN is None:
            y_TN[start:end] = delta
        else:
            y_TN[start:end] += delta.to(y_TN.dtype)
    return y_TN


def lora_weight_grad_ref(
    left_TM: torch.Tensor, right_TN: torch.Tensor, layout: SegmentLayout, slots: LoraSlots, *, scale: bool = False
) -> torch.Tensor:
    """g_RN[rank rows of p] = (s_p if `scale`) * sum over p's segments of left[seg, :r_p]^T @ right[seg].

    Slots without tokens get zeros. The result has left's dtype.
    """
    grad_RN = torch.zeros(slots.total_rank, right_TN.shape[1], dtype=left_TM.dtype, device=left_TM.device)
    for slot, rank in enumerate(slots.ranks):
        rows = [(s, e) for s, e, p in layout.segments if p == slot and e > s]
        if not rows:
            continue
        left = torch.cat([left_TM[s:e, :rank] for s, e in rows]) if len(rows) > 1 else left_TM[slice(*rows[0]), :rank]
        right = torch.cat([right_TN[s:e] for s, e in rows]) if len(rows) > 1 else right_TN[slice(*rows[0])]
        grad = left.T @ right.to(left.dtype)
        offset = slots.rank_offset(slot)
        grad_RN[offset : offset + rank] = grad * slots.scalings[slot] if scale else grad
    return grad_RN
