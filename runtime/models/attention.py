"""Causal attention over a packed token buffer (a leaf call in torch.fx graphs).

Legend: T tokens of the packed buffer, S sequences, H query heads, Hkv key/value heads, D head dim.
Model code calls it as `attention.packed_causal_attention(...)` (through the module) so that
torch.fx's patching of this module's globals makes it a single call_function node.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def repeat_kv(x_THkvD: Tensor, n_rep: int) -> Tensor:
    """Repeat each key/value head n_rep times (head h reads kv head h // n_rep), like
    transformers' repeat_kv."""
    if n_rep == 1:
        return x_THkvD
    t, hkv, d = x_THkvD.shape
    return x_THkvD[:, :, None, :].expand(t, hkv, n_rep, d).reshape(t, hkv * n_rep, d)


def _sliding_window_mask(length: int, window: int, device: torch.device) -> Tensor:
    """Boolean [L, L] mask: key j visible to query i iff i - window < j <= i."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) & (j > i - window)


@torch.fx.wrap
def packed_causal_attention(
    q_THD: Tensor,
    k_THkvD: Tensor,
    v_THkvD: Tensor,
    cu_seqlens: Tensor,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> Tensor:
    """Attention that is causal within each packed sequence and never crosses sequences.

    q: [T, H, D]; k, v: [T, Hkv, D] with H a multiple of Hkv; cu_seqlens: int64 CPU tensor
    [S+1], sequence i occupying tokens cu_seqlens[i]:cu_seqlens[i+1]. `scale` defaults to
    D**-0.5; `sliding_window` W lets a token see only the W most recent tokens (itself included).
    Returns [T, H, D].
    """
    num_heads, head_dim = q_THD.shape[1], q_THD.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    n_rep = num_heads // k_THkvD.shape[1]
    k_THD = repeat_kv(k_THkvD, n_rep)
    v_THD = repeat_kv(v_THkvD, n_rep)
    bounds = cu_seqlens.tolist()
    if not bounds or bounds[0] != 0 or bounds[-1] != q_THD.shape[0]:
        raise ValueError(
            f"cu_seqlens must run from 0 to the token count {q_THD.shape[0]}, got {bounds[:3]}...{bounds[-1:]}"
        )
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if any(length < 0 for length in lengths):
        raise ValueError(f"cu_seqlens must not decrease, got {bounds[:8]}...")
    # torch.split (not slicing) so that backward assembles the gradient once, instead of one
    # full-size zero tensor per sequence.
    outs: list[Tensor] = []
    for q, k, v in zip(q_THD.split(lengths), k_THD.split(lengths), v_THD.split(lengths)):
        length = q.shape[0]
        if length == 0:
            continue
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        if sliding_window is not None and length > sliding_window:
            mask = _sliding_window_mask(length, sliding_window, q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        outs.append(out.transpose(0, 1))
    if not outs:
        return q_THD.new_empty(q_THD.shape)
    if len(outs) == 1:
        return outs[0].contiguous()
    return torch.cat(outs, dim=0)
