"""Causal attention over a packed token buffer, and the attention host that runs it.

Legend: T tokens of the packed buffer, S sequences, L tokens of one sequence, P prefix tokens,
H query heads, Hkv key/value heads, D head dim.

`PackedAttention` is a parameter-free PEFT host (a leaf in torch.fx graphs) that the backbone
families call with the micro-batch layout: each sequence of a task with a prefix module here
(prefix tuning) also attends to that task's P learned keys and values.

Sequences without prefix keys run as one call over the whole buffer where a kernel covers them:
on CUDA in fp16/bf16 one flash call (`muxtune.kernels.varlen_attention`), on the CPU in bf16 the
causal C kernel (`muxtune.kernels.cpu_attention`). The per-sequence products below run
everywhere else.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from muxtune.kernels.cpu_attention import attention_kernel_applies, packed_attention_bf16
from muxtune.kernels.varlen_attention import varlen_applies, varlen_causal_attention

from ..layout import MicroBatchLayout
from ..peft.base import AttachmentKind, KVPrefixModule, PeftHost

Prefix = tuple[Tensor, Tensor]
"""A sequence's prefix keys and values, each [P, Hkv, D]."""


CACHED_BIAS_BYTES = 1 << 20
"""Largest additive mask kept between calls; at most `BIAS_CACHE_SIZE` are kept."""
BIAS_CACHE_SIZE = 64


def _visible(length: int, num_prefix: int, window: int | None, device: torch.device) -> Tensor:
    """Boolean [L, P + L]: key j is visible to query i (at position P + i) iff j <= P + i, and,
    with a sliding window W, j > P + i - W (as transformers masks a cache of P tokens)."""
    i = torch.arange(length, device=device)[:, None] + num_prefix
    j = torch.arange(num_prefix + length, device=device)[None, :]
    visible = j <= i
    if window is not None:
        visible &= j > i - window
    return visible


def _make_bias(
    length: int, num_prefix: int, window: int | None, group: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """`_hidden_bias`, made afresh."""
    hidden = ~_visible(length, num_prefix, window, device)
    bias = torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))
    return bias.expand(group, *bias.shape).reshape(group * length, num_prefix + length)


_cached_bias = functools.lru_cache(maxsize=BIAS_CACHE_SIZE)(_make_bias)


def _hidden_bias(
    length: int, num_prefix: int, window: int | None, group: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Additive mask [G * L, P + L] of a sequence's grouped query rows (0 where a key is visible,
    -inf where not; rows repeat per query head of a group). Small ones are cached: a micro-batch's
    sequences repeat lengths, and every layer asks again."""
    size = group * length * (num_prefix + length) * dtype.itemsize
    make = _cached_bias if size <= CACHED_BIAS_BYTES else _make_bias
    return make(length, num_prefix, window, group, dtype, device)


def _attend(
    q_LHD: Tensor, k_LHkvD: Tensor, v_LHkvD: Tensor, scale: float, window: int | None, prefix: Prefix | None
) -> Tensor:
    """One sequence's causal attention [L, H, D], after its prefix keys/values when given.

    transformers' eager numerics: scores and the weighted sum in the inputs' dtype, softmax in
    fp32. Query heads are grouped by the key/value head they read (head h reads h // (H / Hkv)),
    so each product is one batched matmul over Hkv groups and keys are never repeated; one
    `baddbmm` scales the scores and adds the mask."""
    length, num_heads, head_dim = q_LHD.shape
    num_kv_heads = k_LHkvD.shape[1]
    group = num_heads // num_kv_heads
    num_prefix = 0
    if prefix is not None:
        num_prefix = prefix[0].shape[0]
        k_LHkvD = torch.cat((prefix[0], k_LHkvD), dim=0)
        v_LHkvD = torch.cat((prefix[1], v_LHkvD), dim=0)
    q_grouped = q_LHD.reshape(length, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    q_grouped = q_grouped.reshape(num_kv_heads, group * length, head_dim)
    bias = _hidden_bias(length, num_prefix, window, group, q_LHD.dtype, q_LHD.device)
    scores = torch.baddbmm(bias, q_grouped, k_LHkvD.permute(1, 2, 0), alpha=scale)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_LHD.dtype)
    out = torch.bmm(weights, v_LHkvD.transpose(0, 1))
    return out.view(num_kv_heads, group, length, head_dim).permute(2, 0, 1, 3).reshape(length, num_heads, head_dim)


def _sequence_lengths(cu_seqlens: Tensor, num_tokens: int) -> list[int]:
    bounds = cu_seqlens.tolist()
    if not bounds or bounds[0] != 0 or bounds[-1] != num_tokens:
        raise ValueError(
            f"cu_seqlens must run from 0 to the token count {num_tokens}, got {bounds[:3]}...{bounds[-1:]}"
        )
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if any(length < 0 for length in lengths):
        raise ValueError(f"cu_seqlens must not decrease, got {bounds[:8]}...")
    return lengths


def _packed_attention(
    q_THD: Tensor,
    k_THkvD: Tensor,
    v_THkvD: Tensor,
    lengths: list[int],
    scale: float | None,
    sliding_window: int | None,
    prefixes: list[Prefix | None] | None,
) -> Tensor:
    """`packed_causal_attention` over sequences of `lengths`, sequence i after `prefixes[i]`."""
    scale = q_THD.shape[2] ** -0.5 if scale is None else scale
    if q_THD.shape[0] > 0 and (prefixes is None or not any(prefixes)):
        if varlen_applies(q_THD, scale, sliding_window):
            return varlen_causal_attention(q_THD, k_THkvD, v_THkvD, lengths, scale, sliding_window)
        if attention_kernel_applies(q_THD, k_THkvD, v_THkvD):
            return packed_attention_bf16(q_THD, k_THkvD, v_THkvD, lengths, scale, sliding_window)
    prefixes = [None] * len(lengths) if prefixes is None else prefixes
    # torch.split (not slicing) so that backward assembles the gradient once, instead of one
    # full-size zero tensor per sequence.
    outs: list[Tensor] = []
    for q, k, v, prefix in zip(q_THD.split(lengths), k_THkvD.split(lengths), v_THkvD.split(lengths), prefixes):
        if q.shape[0] > 0:
            outs.append(_attend(q, k, v, scale, sliding_window, prefix))
    if not outs:
        return q_THD.new_empty(q_THD.shape)
    if len(outs) == 1:
        return outs[0].contiguous()
    return torch.cat(outs, dim=0)


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
    lengths = _sequence_lengths(cu_seqlens, q_THD.shape[0])
    return _packed_attention(q_THD, k_THkvD, v_THkvD, lengths, scale, sliding_window, None)


class PackedAttention(PeftHost):
    """The attention of one layer over a packed buffer, as a PEFT host of prefix modules.

    Parameter-free (checkpoint keys are unchanged). A task with a `KVPrefixModule` here has each
    of its sequences attend to the module's P keys and values first: all P are visible to every
    query, then attention is causal over the sequence (positions P.. under a sliding window).
    Sequences of other tasks are computed exactly as without the host.
    """

    accepted_kinds = frozenset({AttachmentKind.KV_PREFIX})

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, sliding_window: int | None = None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.adapters = nn.ModuleDict()

    def forward(self, q_THD: Tensor, k_THkvD: Tensor, v_THkvD: Tensor, layout: MicroBatchLayout) -> Tensor:
        """Attention of the packed buffer [T, H, D]; sequences of tasks with a prefix module here
        attend to their task's prefix first."""
        lengths = _sequence_lengths(layout.cu_seqlens_S1, q_THD.shape[0])
        if not any(seg.task in self.adapters for seg in layout.segments):
            return _packed_attention(q_THD, k_THkvD, v_THkvD, lengths, self.scale, self.sliding_window, None)
        task_prefix: dict[str, Prefix] = {}
        for seg in layout.segments:
            module = self.adapters[seg.task] if seg.task in self.adapters else None
            if isinstance(module, KVPrefixModule):
                keys, values = module.keys_values()
                task_prefix[seg.task] = (keys.to(k_THkvD.dtype), values.to(v_THkvD.dtype))
        prefixes: list[Prefix | None] = []
        starts = layout.cu_seqlens_S1.tolist()[:-1]
        segments = iter(layout.segments)
        seg = next(segments, None)
        for start in starts:
            while seg is not None and start >= seg.end:
                seg = next(segments, None)
            inside = seg is not None and seg.start <= start < seg.end
            prefixes.append(task_prefix.get(seg.task) if inside else None)
        return _packed_attention(q_THD, k_THkvD, v_THkvD, lengths, self.scale, self.sliding_window, prefixes)

    def extra_repr(self) -> str:
        window = "" if self.sliding_window is None else f", sliding_window={self.sliding_window}"
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}{window}"
