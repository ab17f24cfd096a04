"""The CPU LoRA kernels (`muxtune.kernels.cpu_lora`) against fp64 products of the same bf16 and
fp32 values: fp32 results within a few roundings of their sums, bf16 results within one bf16
rounding; shapes off every vector width, empty inputs, and the same bits whatever the thread
count. `ParallelLora` on them against peft's autograd expression is in
tests/runtime/test_lora_function.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from muxtune.kernels import cpu_build, cpu_lora

pytestmark = pytest.mark.skipif(cpu_build.library() is None, reason="no C compiler for the CPU kernels")

BF16_STEP = 2.0**-8
"""Relative spacing of bf16 values: one rounding moves a value by at most half of it."""


def _close_fp32(actual: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor, terms: int) -> None:
    """Within fp32 sums' rounding: a few ulps of the summed magnitudes per term."""
    bound = 4 * terms * torch.finfo(torch.float32).eps * magnitude + 1e-30
    assert actual.dtype == torch.float32
    assert ((actual.double() - exact).abs() <= bound).all()


def _close_bf16(actual: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor, terms: int) -> None:
    """One bf16 rounding of a value within fp32 rounding of the exact one."""
    fp32_slack = 4 * terms * torch.finfo(torch.float32).eps * magnitude
    bound = BF16_STEP * (exact.abs() + fp32_slack) + fp32_slack + 1e-30
    assert actual.dtype == torch.bfloat16
    assert ((actual.double() - exact).abs() <= bound).all()


def _inputs(rows: int, inner: int, width: int, rank: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(rows, inner, generator=generator).to(torch.bfloat16),
        "base": torch.randn(rows, width, generator=generator).to(torch.bfloat16),
        "a": torch.randn(rank, inner, generator=generator),
        "b_t": torch.randn(rank, width, generator=generator),
        "h": torch.randn(rows, rank, generator=generator),
    }


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(0, 37),
    inner=st.integers(1, 80),
    width=st.integers(1, 80),
    rank=st.integers(1, 19),
    scale=st.sampled_from([1.0, 2.0, 0.3]),
    seed=st.integers(0, 1000),
)
def test_kernels_match_fp64_products(rows: int, inner: int, width: int, rank: int, scale: float, seed: int) -> None:
    t = _inputs(rows, inner, width, rank, seed)
    x, base, a, b_t, h = (t[k].double() for k in ("x", "base", "a", "b_t", "h"))

    dot = cpu_lora.rows_dot(t["x"], t["a"], scale)
    _close_fp32(dot, scale * x @ a.T, scale * x.abs() @ a.abs().T, inner)

    expanded = cpu_lora.expand(t["h"], t["b_t"], t["base"], scale)
    products = scale * h.abs() @ b_t.abs()
    _close_bf16(expanded, base + scale * h @ b_t, products + base.abs(), rank + 1)
    _close_bf16(cpu_lora.expand(t["h"], t["b_t"], None, scale), scale * h @ b_t, products, rank)

    summed = cpu_lora.outer(t["base"], t["h"], scale)
    _close_fp32(summed, scale * h.T @ base, scale * h.abs().T @ base.abs(), rows)


@pytest.mark.parametrize(("rows", "inner", "width", "rank"), [(540, 576, 1536, 8), (131, 200, 97, 33), (64, 40, 47, 3)])
def test_results_do_not_depend_on_the_thread_count(rows: int, inner: int, width: int, rank: int) -> None:
    t = _inputs(rows, inner, width, rank, seed=5)
    calls = {
        "rows_dot": lambda: cpu_lora.rows_dot(t["x"], t["a"], 0.5),
        "expand": lambda: cpu_lora.expand(t["h"], t["b_t"], t["base"], 2.0),
        "outer": lambda: cpu_lora.outer(t["base"], t["h"], 2.0),
    }
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = {name: call() for name, call in calls.items()}
        torch.set_num_threads(2)
        split = {name: call() for name, call in calls.items()}
    finally:
        torch.set_num_threads(threads)
    for name in calls:
        assert torch.equal(alone[name], split[name]), name


def test_a_row_does_not_depend_on_the_other_rows() -> None:
    t = _inputs(40, 72, 66, 9, seed=6)
    whole = cpu_lora.expand(t["h"], t["b_t"], t["base"], 1.5)
    part = cpu_lora.expand(t["h"][13:21], t["b_t"], t["base"][13:21], 1.5)
    assert torch.equal(whole[13:21], part)
    assert torch.equal(cpu_lora.rows_dot(t["x"], t["a"])[5:9], cpu_lora.rows_dot(t["x"][5:9], t["a"]))


def test_kernels_apply_only_to_bf16_activations_with_fp32_adapters() -> None:
    x, y = torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(4, 6, dtype=torch.bfloat16)
    a, b = torch.zeros(2, 8), torch.zeros(6, 2)
    assert cpu_lora.lora_kernels_apply(x, y, a, b)
    assert not cpu_lora.lora_kernels_apply(x.float(), y.float(), a, b)
    assert not cpu_lora.lora_kernels_apply(x, y, a.bfloat16(), b.bfloat16())
    assert not cpu_lora.lora_kernels_apply(x[None], y[None], a, b)
