"""Causal attention over packed sequences on CUDA in one flash call (`varlen_attn`).

`torch.nn.attention.varlen.varlen_attn` takes the packed buffer and the sequences' cumulative
offsets, with a backward, but runs on CUDA only and in fp16/bf16 (DESIGN section 10). Where it
applies (`varlen_applies`) the runtime's packed attention calls `varlen_causal_attention`
instead of one eager product pair per sequence; elsewhere (the CPU, fp32, prefix keys) it keeps
that path. Flash keeps the softmax in fp32 and never rounds the scores to the inputs' dtype, so
results differ from the eager path by the inputs' rounding, not more.

The offsets are built on the host once per distinct set of sequence lengths and CUDA stream and
moved with one copy (`_device_offsets`), so nothing on the path reads a device value back.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Sequence

import torch

from .lora_layout import current_stream_id

VARLEN_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
OFFSETS_CACHE_SIZE = 256


@functools.cache
def varlen_parameters() -> frozenset[str]:
    """The keyword parameters this torch's `varlen_attn` takes (empty without the module).
    torch 2.10 has `is_causal` and no `scale`; later releases add `scale`, `window_size` and
    `enable_gqa`."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return frozenset()
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_arguments(
    parameters: frozenset[str], head_dim: int, scale: float, sliding_window: int | None
) -> dict[str, object] | None:
    """The masking and scaling keyword arguments of a causal `varlen_attn` call with these
    parameters, or None when that torch cannot make it: a sliding window without `window_size`,
    a scale other than D**-0.5 without `scale`."""
    arguments: dict[str, object] = {}
    if "window_size" in parameters:
        arguments["window_size"] = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    elif sliding_window is None and "is_causal" in parameters:
        arguments["is_causal"] = True
    else:
        return None
    if "scale" in parameters:
        arguments["scale"] = scale
    elif scale != head_dim**-0.5:
        return None
    return arguments


def varlen_applies(q_THD: torch.Tensor, scale: float, sliding_window: int | None) -> bool:
    """Whether `varlen_causal_attention` can run attention for queries `q_THD` [T, H, D]."""
    head_dim = q_THD.shape[-1]
    return (
        q_THD.is_cuda
        and q_THD.dtype in VARLEN_DTYPES
        and head_dim <= MAX_HEAD_DIM
        and head_dim % 8 == 0
        and varlen_arguments(varlen_parameters(), head_dim, scale, sliding_window) is not None
    )


@functools.lru_cache(maxsize=OFFSETS_CACHE_SIZE)
def _device_offsets(lengths: tuple[int, ...], device: torch.device, stream: int = 0) -> torch.Tensor:
    """int32 cumulative offsets [S + 1] of `lengths` on `device`, copied once per CUDA stream
    (`stream`, `current_stream_id`: only a cache key; the copy is ordered on that stream)."""
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    host = torch.tensor(offsets, dtype=torch.int32)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def varlen_causal_attention(
    q_THD: torch.Tensor,
    k_THkvD: torch.Tensor,
    v_THkvD: torch.Tensor,
    lengths: Sequence[int],
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Attention [T, H, D] causal within each of the packed sequences of `lengths` (never across
    them); with `sliding_window` W a token sees itself and the W - 1 tokens before it. Query head
    h reads key/value head h // (H / Hkv) (heads repeated where this torch's `varlen_attn` has
    no `enable_gqa`). Only where `varlen_applies`."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = varlen_parameters()
    arguments = varlen_arguments(parameters, q_THD.shape[-1], scale, sliding_window)
    assert arguments is not None, "varlen_causal_attention called where varlen_applies is false"
    group = q_THD.shape[1] // k_THkvD.shape[1]
    if group > 1 and "enable_gqa" in parameters:
        arguments["enable_gqa"] = True
    elif group > 1:
        k_THkvD = k_THkvD.repeat_interleave(group, dim=1)
        v_THkvD = v_THkvD.repeat_interleave(group, dim=1)
    offsets = _device_offsets(tuple(lengths), q_THD.device, current_stream_id(q_THD.device))
    longest = max(lengths)
    return varlen_attn(q_THD, k_THkvD, v_THkvD, offsets, offsets, longest, longest, **arguments)
