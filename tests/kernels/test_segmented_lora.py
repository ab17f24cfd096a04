"""Triton segmented LoRA against the torch reference and a naive per-task computation.

Without CUDA the Triton kernels run in Triton's interpreter (see conftest.py); block sizes are
shrunk to 16 so that small shapes still take several feature, rank and row blocks.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lora_cases import DEVICE, Case, Inputs, assert_all_close, cases, make_inputs, naive, run_kernels

from muxtune.kernels import lora_reference, lora_triton

PRIMITIVES = ("lora_shrink", "lora_expand", "lora_weight_grad")


@pytest.fixture(autouse=True, scope="module")
def small_blocks():
    """Blocks of 16 features and ranks, so small shapes take several blocks (and rank 17+ two)."""
    previous = lora_triton.BLOCKS
    lora_triton.BLOCKS = lora_triton.Blocks(n=16, k=16, max_r=16)
    yield
    lora_triton.BLOCKS = previous


MIXED = Case(((0, 3, 0), (3, 3, 1), (5, 40, 1), (40, 41, 2), (41, 41, 0)), 48, (1, 17, 4), (2.0, 0.5, 16.0), 33, 19)
FP32 = 1e-5
LOW = 4e-2  # bf16 / fp16 against fp32, relative to each tensor's largest magnitude


@given(case=cases(), fused=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None, database=None)
def test_reference_matches_naive(case: Case, fused: bool, seed: int) -> None:
    inputs = make_inputs(case, torch.float32, fused, seed)
    assert_all_close(run_kernels(inputs, "torch"), naive(inputs), FP32)


@given(case=cases(), fused=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None, database=None)
@example(case=MIXED, fused=True, seed=1)
def test_triton_fp32_matches_reference_and_naive(case: Case, fused: bool, seed: int) -> None:
    inputs = make_inputs(case, torch.float32, fused, seed)
    got = run_kernels(inputs, "triton")
    assert_all_close(got, run_kernels(inputs, "torch"), FP32)
    assert_all_close(got, naive(inputs), FP32)


@given(
    case=cases(max_tokens=48),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    fused=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=10, deadline=None, database=None)
@example(case=MIXED, dtype=torch.bfloat16, fused=True, seed=1)
@example(case=MIXED, dtype=torch.float16, fused=False, seed=2)
def test_triton_16_bit_close_to_fp32(case: Case, dtype: torch.dtype, fused: bool, seed: int) -> None:
    inputs = make_inputs(case, dtype, fused, seed)
    got = run_kernels(inputs, "triton")
    assert all(t.dtype == dtype for t in got.values())
    assert_all_close(got, naive(inputs), LOW)
    assert_all_close(run_kernels(inputs, "torch"), naive(inputs), LOW)


def test_triton_and_reference_share_signatures() -> None:
    for name in PRIMITIVES:
        triton_fn, ref_fn = getattr(lora_triton, f"{name}_triton"), getattr(lora_reference, f"{name}_ref")
        assert inspect.signature(triton_fn) == inspect.signature(ref_fn), name


def primitive_results(suffix: str, inputs: Inputs, scale: bool) -> dict[str, torch.Tensor]:
    """Every kernel of one backend on the same operands (those of a forward and a backward pass)."""
    impl = lora_triton if suffix == "triton" else lora_reference
    shrink, expand, weight_grad = (getattr(impl, f"{name}_{suffix}") for name in PRIMITIVES)
    layout, slots = inputs.case.layout(), inputs.case.slots()
    x_TD, base_TO, g_TO = inputs.x_TD.detach(), inputs.base_TO.detach(), inputs.grad_TO
    a_RD = torch.cat([a.detach() for a in inputs.lora_A])
    b_OR = torch.cat([b.detach() for b in inputs.lora_B], dim=1)
    h_TM = shrink(x_TD, a_RD, layout, slots, scale=scale)
    return {
        "h": h_TM,
        "dh": shrink(g_TO, b_OR.T, layout, slots, scale=scale),
        "y": expand(h_TM, b_OR, layout, slots, scale=scale),
        "y_fused": expand(h_TM, b_OR, layout, slots, base_TN=base_TO, scale=scale),
        "dx": expand(h_TM, a_RD.T, layout, slots, scale=scale),
        "dA": weight_grad(h_TM, x_TD, layout, slots, scale=scale),
        "dB_T": weight_grad(h_TM, g_TO, layout, slots, scale=scale),
    }


@given(case=cases(), scale=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=8, deadline=None, database=None)
def test_primitives_match_reference(case: Case, scale: bool, seed: int) -> None:
    """Each kernel alone, including h's zero columns past a slot's rank and rows outside segments."""
    inputs = make_inputs(case, torch.float32, fused=True, seed=seed)
    assert_all_close(primitive_results("triton", inputs, scale), primitive_results("ref", inputs, scale), FP32)


def huge_and_tiny() -> Case:
    """One 200-token segment, then 24 segments of 0 to 2 tokens; slot 4 has no tokens at all."""
    segments, cursor = [(0, 200, 0)], 200
    for i in range(24):
        length = i % 3
        segments.append((cursor, cursor + length, 1 + i % 3))
        cursor += length + (i % 2)
    return Case(tuple(segments), cursor + 3, (8, 1, 20, 2, 4), (2.0, 1.0, 0.5, 16.0, 1.0), 24, 20)


@pytest.mark.parametrize("fused", [True, False])
def test_one_huge_many_tiny_segments(fused: bool) -> None:
    inputs = make_inputs(huge_and_tiny(), torch.float32, fused, seed=7)
    got = run_kernels(inputs, "triton")
    assert_all_close(got, naive(inputs), FP32)
    assert_all_close(got, run_kernels(inputs, "torch"), FP32)
    assert not got["A4"].any() and not got["B4"].any()
    again = run_kernels(inputs, "triton")
    assert all(torch.equal(got[k], again[k]) for k in got), "Triton results must be deterministic"


def test_mixed_dtypes_compute_in_weight_dtype() -> None:
    """bf16 activations and base with fp32 weights: products run in fp32, outputs keep their dtypes."""
    case = Case(((0, 10, 0), (10, 10, 1), (14, 40, 1)), 45, (3, 17), (2.0, 0.5), 20, 18)
    inputs = make_inputs(case, torch.float32, fused=True, seed=3)
    inputs = type(inputs)(
        case,
        inputs.x_TD.detach().bfloat16().requires_grad_(),
        inputs.lora_A,
        inputs.lora_B,
        inputs.base_TO.detach().bfloat16().requires_grad_(),
        inputs.grad_TO.bfloat16(),
    )
    got = run_kernels(inputs, "triton")
    assert got["y"].dtype == got["x"].dtype == torch.bfloat16 and got["A0"].dtype == torch.float32
    assert_all_close(got, run_kernels(inputs, "torch"), LOW)
    assert_all_close(got, naive(inputs), LOW)


def test_empty_micro_batch() -> None:
    inputs = make_inputs(Case((), 0, (4,), (1.0,), 8, 8), torch.float32, fused=True, seed=0)
    got = run_kernels(inputs, "triton")
    assert got["y"].shape == (0, 8) and not got["A0"].any()


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_tensors_pick_triton() -> None:
    from muxtune.kernels import chosen_backend

    assert chosen_backend(torch.zeros(1, device="cuda")) == "triton"
