"""Packed attention through flash `varlen_attn` on CUDA against the per-sequence eager path."""

from __future__ import annotations

import pytest
import torch

from muxtune.kernels.varlen_attention import _device_offsets, varlen_applies, varlen_arguments, varlen_parameters
from muxtune.runtime.models.attention import packed_causal_attention

LENGTHS = (5, 1, 17, 0, 64, 9)


def test_varlen_applies_only_to_cuda_half_precision() -> None:
    assert not varlen_applies(torch.zeros(4, 2, 64, dtype=torch.bfloat16), 0.125, None)
    assert not varlen_applies(torch.zeros(4, 2, 64, dtype=torch.float32), 0.125, None)


TORCH_2_10 = frozenset({"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal", "return_aux"})
TORCH_2_12 = (TORCH_2_10 - {"is_causal"}) | {"scale", "window_size", "enable_gqa", "num_splits"}


def test_arguments_follow_the_signature_of_each_torch() -> None:
    """Causal masking and scale as each generation of `varlen_attn` takes them; what one cannot
    express (a sliding window, a non-default scale) keeps the eager path."""
    assert varlen_arguments(TORCH_2_12, 64, 0.125, None) == {"window_size": (-1, 0), "scale": 0.125}
    assert varlen_arguments(TORCH_2_12, 64, 0.3, 8) == {"window_size": (7, 0), "scale": 0.3}
    assert varlen_arguments(TORCH_2_10, 64, 0.125, None) == {"is_causal": True}
    assert varlen_arguments(TORCH_2_10, 64, 0.125, 8) is None, "no window_size"
    assert varlen_arguments(TORCH_2_10, 64, 0.3, None) is None, "no scale"
    assert varlen_arguments(frozenset(), 64, 0.125, None) is None, "no varlen_attn"
    assert {"window_size", "scale", "enable_gqa"} <= varlen_parameters(), "this torch's varlen_attn"


def test_offsets_are_cumulative_and_built_once() -> None:
    offsets = _device_offsets(LENGTHS, torch.device("cpu"))
    assert offsets.dtype == torch.int32
    assert offsets.tolist() == [0, 5, 6, 23, 23, 87, 96]
    assert _device_offsets(LENGTHS, torch.device("cpu")) is offsets


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen_attn runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 8])
def test_varlen_matches_eager_attention(dtype: torch.dtype, window: int | None) -> None:
    """Forward and backward in half precision through flash against the eager path in fp32 (the
    same inputs), GQA with 8 query heads over 2 key/value heads."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    tokens = sum(LENGTHS)
    shapes = ((tokens, 8, 64), (tokens, 2, 64), (tokens, 2, 64))
    inputs = [torch.randn(s, device="cuda", generator=generator, dtype=dtype).requires_grad_(True) for s in shapes]
    cu_seqlens = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int64)
    if not varlen_applies(inputs[0], 64**-0.5, window):
        pytest.skip(f"this torch's varlen_attn cannot make this call (takes {sorted(varlen_parameters())})")
    out = packed_causal_attention(*inputs, cu_seqlens, sliding_window=window)
    upstream = torch.randn(out.shape, device="cuda", generator=generator, dtype=dtype)
    grads = torch.autograd.grad(out, inputs, upstream)
    wide = [t.detach().float().requires_grad_(True) for t in inputs]
    expected = packed_causal_attention(*wide, cu_seqlens, sliding_window=window)
    expected_grads = torch.autograd.grad(expected, wide, upstream.float())
    for got, want in zip((out, *grads), (expected, *expected_grads)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
