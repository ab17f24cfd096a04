"""Packed attention against plain torch's scaled_dot_product_attention, one sequence at a time,
with grouped query heads, prefix keys/values and a sliding window, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from muxtune.runtime.models import attention
from muxtune.runtime.models.attention import _packed_attention

HEADS, KV_HEADS, HEAD_DIM = 6, 2, 8
LENGTHS = [5, 0, 1, 12, 7]


def reference(q, k, v, lengths, window, prefixes):
    """Each sequence alone through torch's SDPA with an explicit boolean mask."""
    outs = []
    for q_s, k_s, v_s, prefix in zip(q.split(lengths), k.split(lengths), v.split(lengths), prefixes):
        length = q_s.shape[0]
        if length == 0:
            continue
        num_prefix = 0 if prefix is None else prefix[0].shape[0]
        if prefix is not None:
            k_s, v_s = torch.cat((prefix[0], k_s)), torch.cat((prefix[1], v_s))
        i = torch.arange(length)[:, None] + num_prefix
        j = torch.arange(num_prefix + length)[None, :]
        visible = (j <= i) & (j > i - window) if window is not None else j <= i
        out = F.scaled_dot_product_attention(
            q_s.transpose(0, 1).float(),
            k_s.transpose(0, 1).float(),
            v_s.transpose(0, 1).float(),
            attn_mask=visible,
            enable_gqa=True,
        )
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("cached_masks", [True, False])
def test_packed_attention_matches_sdpa(
    dtype: torch.dtype, window: int | None, with_prefix: bool, cached_masks: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not cached_masks:
        monkeypatch.setattr(attention, "CACHED_BIAS_BYTES", 0)
    generator = torch.Generator().manual_seed(0)
    total = sum(LENGTHS)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype).requires_grad_()

    q, k, v = leaf(total, HEADS, HEAD_DIM), leaf(total, KV_HEADS, HEAD_DIM), leaf(total, KV_HEADS, HEAD_DIM)
    prefix = (leaf(3, KV_HEADS, HEAD_DIM), leaf(3, KV_HEADS, HEAD_DIM)) if with_prefix else None
    prefixes = [prefix if i % 2 == 0 else None for i in range(len(LENGTHS))]
    grad = torch.randn(total, HEADS, HEAD_DIM, generator=generator).to(dtype)
    inputs = [q, k, v] + (list(prefix) if prefix else [])

    got = _packed_attention(q, k, v, LENGTHS, None, window, prefixes)
    got_grads = torch.autograd.grad(got, inputs, grad)
    want = reference(q, k, v, LENGTHS, window, prefixes)
    want_grads = torch.autograd.grad(want, inputs, grad.float())

    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **tolerance)
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad.float(), want_grad.float(), **tolerance)
