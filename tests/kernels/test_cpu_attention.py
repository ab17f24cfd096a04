"""The CPU causal attention kernel (`muxtune.kernels.cpu_attention`) against fp64 attention of the
same bf16 values, forward and backward: every result within one bf16 rounding of its terms'
magnitudes (the kernel rounds the weights and ds to bf16, as flash attention does); lengths off
every block size, empty sequences, grouped query heads, sliding windows; the same bits whatever the thread count
and whatever else is packed beside a sequence. Packed attention against SDPA (through this
kernel where it applies) is in tests/runtime/test_attention.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from muxtune.kernels import cpu_attention, cpu_build
from muxtune.runtime.models.attention import _packed_attention

pytestmark = pytest.mark.skipif(cpu_build.library() is None, reason="no C compiler for the CPU kernels")

BF16_STEP = 2.0**-8
"""Relative spacing of bf16 values: one rounding moves a value by at most half of it."""


def _inputs(lengths: list[int], heads: int, kv_heads: int, dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)

    def bf16(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(torch.bfloat16)

    return bf16(tokens, heads, dim), bf16(tokens, kv_heads, dim), bf16(tokens, kv_heads, dim), bf16(tokens, heads, dim)


def _exact(q, k, v, dout, lengths: list[int], scale: float, window: int | None) -> dict[str, torch.Tensor]:
    """fp64 results and, for each, the magnitude of its terms (sums of absolute values)."""
    group = q.shape[1] // k.shape[1]
    parts: dict[str, list[torch.Tensor]] = {}
    pieces = zip(*(t.double().split(lengths) for t in (q, k, v, dout)))
    for q_s, k_s, v_s, g_s in pieces:
        length = q_s.shape[0]
        k_h, v_h = k_s.repeat_interleave(group, 1), v_s.repeat_interleave(group, 1)
        scores = torch.einsum("ihd,jhd->hij", q_s, k_h) * scale
        i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
        hidden = (j > i) | (j <= i - window) if window is not None else j > i
        p = scores.masked_fill(hidden, float("-inf")).softmax(-1)
        dw = torch.einsum("ihd,jhd->hij", g_s, v_h)
        mean = (p * dw).sum(-1, keepdim=True)
        ds = p * (dw - mean)
        ds_mag = ds.abs() + 1e-4 * p * (dw.abs() + mean.abs())

        def per_kv(x_hjd: torch.Tensor) -> torch.Tensor:
            return x_hjd.reshape(k_s.shape[1], group, length, q.shape[2]).sum(1).transpose(0, 1)

        values = {
            "out": torch.einsum("hij,jhd->ihd", p, v_h),
            "out_mag": torch.einsum("hij,jhd->ihd", p, v_h.abs()),
            "dq": scale * torch.einsum("hij,jhd->ihd", ds, k_h),
            "dq_mag": scale * torch.einsum("hij,jhd->ihd", ds_mag, k_h.abs()),
            "dk": scale * per_kv(torch.einsum("hij,ihd->hjd", ds, q_s)),
            "dk_mag": scale * per_kv(torch.einsum("hij,ihd->hjd", ds_mag, q_s.abs())),
            "dv": per_kv(torch.einsum("hij,ihd->hjd", p, g_s)),
            "dv_mag": per_kv(torch.einsum("hij,ihd->hjd", p, g_s.abs())),
        }
        for name, value in values.items():
            parts.setdefault(name, []).append(value)
    return {name: torch.cat(value) for name, value in parts.items()}


def _kernel(q, k, v, dout, lengths: list[int], scale: float, window: int | None = None) -> dict[str, torch.Tensor]:
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = cpu_attention.packed_attention_bf16(*leaves, lengths, scale, window)
    dq, dk, dv = torch.autograd.grad(out, leaves, dout)
    return {"out": out, "dq": dq, "dk": dk, "dv": dv}


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 70), min_size=1, max_size=4),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (6, 3), (3, 3)]),
    dim=st.sampled_from([2, 8, 24, 64]),
    window=st.one_of(st.none(), st.integers(1, 40)),
    seed=st.integers(0, 1000),
)
def test_kernel_matches_fp64_attention(
    lengths: list[int], heads: tuple[int, int], dim: int, window: int | None, seed: int
) -> None:
    q, k, v, dout = _inputs(lengths, *heads, dim, seed)
    scale = dim**-0.5
    got = _kernel(q, k, v, dout, lengths, scale, window)
    if sum(lengths) == 0:
        assert all(t.shape[0] == 0 for t in got.values())
        return
    exact = _exact(q, k, v, dout, lengths, scale, window)
    for name in ("out", "dq", "dk", "dv"):
        assert got[name].dtype == torch.bfloat16
        bound = BF16_STEP * (exact[name].abs() + exact[f"{name}_mag"]) + 1e-6
        assert ((got[name].double() - exact[name]).abs() <= bound).all(), name


def test_results_do_not_depend_on_threads_or_neighbours(monkeypatch: pytest.MonkeyPatch) -> None:
    lengths = [90, 7, 130, 0, 61]
    q, k, v, dout = _inputs(lengths, 6, 2, 64, seed=3)
    monkeypatch.setattr(cpu_attention, "FLOPS_PER_THREAD", 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kernel(q, k, v, dout, lengths, 0.125)
        torch.set_num_threads(2)
        two = _kernel(q, k, v, dout, lengths, 0.125)
    finally:
        torch.set_num_threads(threads)
    for name in one:
        assert torch.equal(one[name], two[name]), name
    start = sum(lengths[:2])
    alone = _kernel(*(t[start : start + 130] for t in (q, k, v, dout)), [130], 0.125)
    for name in one:
        assert torch.equal(one[name][start : start + 130], alone[name]), name


def test_packed_attention_runs_the_kernel_only_where_it_applies() -> None:
    q, k, v, _ = _inputs([5, 9], 4, 2, 16, seed=0)
    out = _packed_attention(q.requires_grad_(), k, v, [5, 9], None, None, None)
    assert type(out.grad_fn).__name__ == "_PackedCausalAttentionBackward"
    assert cpu_attention.attention_kernel_applies(q, k, v)
    assert not cpu_attention.attention_kernel_applies(q.float(), k.float(), v.float())
    assert not cpu_attention.attention_kernel_applies(q[..., :15], k[..., :15], v[..., :15])
    prefix = (k[:3].clone(), v[:3].clone())
    with_prefix = _packed_attention(q, k, v, [5, 9], None, None, [prefix, None])
    assert type(with_prefix.grad_fn).__name__ != "_PackedCausalAttentionBackward"
