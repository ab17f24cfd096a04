"""The fused CPU kernels (`muxtune.kernels.cpu_fused`) against torch's eager chains they replace,
forward and backward, and their build (`cpu_build`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from muxtune.kernels import cpu_build, cpu_fused

pytestmark = pytest.mark.skipif(cpu_build.library() is None, reason="no C compiler for the fused CPU kernels")

DTYPES = (torch.float32, torch.bfloat16)


def eager(monkeypatch: pytest.MonkeyPatch, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`fn` with the kernels switched off: its eager chain."""

    def run(*args: object) -> torch.Tensor:
        with monkeypatch.context() as patch:
            patch.setattr(cpu_fused, "fused_applies", lambda *tensors: False)
            return fn(*args)

    return run


def run_both(
    fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fn's output and the gradients of its floating inputs that require them, for a random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    wanted = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(out, wanted, upstream) if wanted else ()
    return out.detach(), list(grads)


def assert_one_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to one rounding of the dtype, relative to each value, plus what the last bits of
    fp32 intermediates can change where a result cancels (relative to the largest value)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual.double(), expected.double()
    assert torch.isnan(a).equal(torch.isnan(e))
    finite = ~torch.isnan(e)
    if not finite.any():
        return
    step = torch.finfo(actual.dtype).eps * (8 if actual.dtype == torch.float32 else 1)
    scale = e[finite].abs().max().item()
    bound = step * e.abs() + 1e-6 * scale
    assert ((a - e).abs()[finite] <= bound[finite]).all(), (a - e).abs().max()


def rms_inputs(dtype: torch.dtype, rows: int, cols: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(rows * 31 + cols)
    x = (torch.randn(rows, cols, generator=generator) * 3).to(dtype).requires_grad_(True)
    weight = (torch.rand(cols, generator=generator) + 0.5).to(dtype)
    return [x, weight]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (5, 16), (33, 576), (0, 8), (3, 17)])
def test_rms_norm_matches_eager(dtype: torch.dtype, shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = rms_inputs(dtype, *shape)

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return cpu_fused.rms_norm(x, weight, 1e-5)

    fused_out, fused_grads = run_both(norm, inputs)
    eager_out, eager_grads = run_both(eager(monkeypatch, norm), inputs)
    assert_one_rounding(fused_out, eager_out)
    assert_one_rounding(fused_grads[0], eager_grads[0])


def test_rms_norm_with_a_trained_weight_keeps_the_eager_chain() -> None:
    x, weight = rms_inputs(torch.float32, 4, 8)
    weight.requires_grad_(True)
    out = cpu_fused.rms_norm(x, weight, 1e-6)
    assert out.grad_fn is not None and "RmsNorm" not in type(out.grad_fn).__name__
    (grad_weight,) = torch.autograd.grad(out.sum(), [weight])
    assert grad_weight.abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (64, 1536)])
def test_silu_and_mul_matches_eager(
    dtype: torch.dtype, shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = torch.Generator().manual_seed(shape[1])
    gate = (torch.randn(shape, generator=generator) * 4).to(dtype).requires_grad_(True)
    up = torch.randn(shape, generator=generator).to(dtype).requires_grad_(True)
    fused_out, fused_grads = run_both(cpu_fused.silu_and_mul, [gate, up])
    eager_out, eager_grads = run_both(eager(monkeypatch, cpu_fused.silu_and_mul), [gate, up])
    assert_one_rounding(fused_out, eager_out)
    for fused_grad, eager_grad in zip(fused_grads, eager_grads, strict=True):
        assert_one_rounding(fused_grad, eager_grad)


def test_silu_and_mul_extremes_and_nan() -> None:
    gate = torch.tensor([[-200.0, -88.0, -20.0, 0.0, 20.0, 90.0, 200.0, float("nan"), float("inf"), -float("inf")]])
    up = torch.ones_like(gate)
    for dtype in DTYPES:
        out = cpu_fused.silu_and_mul(gate.to(dtype), up.to(dtype)).float()
        expected = (torch.nn.functional.silu(gate.to(dtype)) * up.to(dtype)).float()
        assert torch.isnan(out[0, 7]) and torch.isnan(expected[0, 7])
        assert out[0, 8] == float("inf") and torch.isnan(out[0, 9]) == torch.isnan(expected[0, 9])
        assert torch.allclose(out[0, :7], expected[0, :7], rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 2), (9, 3, 64), (40, 9, 64), (5, 2, 6)])
def test_rotary_matches_eager_bitwise(
    dtype: torch.dtype, shape: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every value rotary positions store is a product or sum of two values of the dtype, rounded
    once: the kernel reproduces eager bit for bit."""
    tokens, _, dim = shape
    generator = torch.Generator().manual_seed(dim)
    x = torch.randn(shape, generator=generator).to(dtype).requires_grad_(True)
    angles = torch.randn(tokens, dim // 2, generator=generator) * 10
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    fused_out, fused_grads = run_both(cpu_fused.rotary, [x, cos, sin])
    eager_out, eager_grads = run_both(eager(monkeypatch, cpu_fused.rotary), [x, cos, sin])
    if dtype == torch.bfloat16:
        assert torch.equal(fused_out, eager_out) and torch.equal(fused_grads[0], eager_grads[0])
    assert_one_rounding(fused_out, eager_out)
    assert_one_rounding(fused_grads[0], eager_grads[0])


def test_rows_are_independent_of_the_batch_and_the_thread_split() -> None:
    """A row's result does not depend on the rows beside it or on how many threads share the call
    (what keeps a task's training equal fused and alone, on any plan)."""
    x, weight = rms_inputs(torch.bfloat16, 300, 576)
    gate = torch.randn(300, 1536).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone_norm = cpu_fused.rms_norm(x[17:18].detach(), weight, 1e-6)
        single_norm = cpu_fused.rms_norm(x.detach(), weight, 1e-6)
        single_silu = cpu_fused.silu_and_mul(gate, gate)
        torch.set_num_threads(4)
        split_norm = cpu_fused.rms_norm(x.detach(), weight, 1e-6)
        split_silu = cpu_fused.silu_and_mul(gate, gate)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone_norm, single_norm[17:18])
    assert torch.equal(single_norm, split_norm) and torch.equal(single_silu, split_silu)


def test_other_devices_and_dtypes_keep_the_eager_chain() -> None:
    half = torch.randn(4, 8, dtype=torch.float16)
    assert not cpu_fused.fused_applies(half)
    assert not cpu_fused.fused_applies(torch.randn(2, 2), torch.randn(2, 2, dtype=torch.bfloat16))
    assert not cpu_fused.fused_applies(torch.empty(2, 2, device="meta"))
    out = cpu_fused.silu_and_mul(half, half)
    assert out.dtype == torch.float16 and torch.equal(out, torch.nn.functional.silu(half) * half)


@pytest.fixture
def fresh_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty kernel cache, and `library()` forgotten before and after the test."""
    monkeypatch.setenv("MUXTUNE_CACHE_DIR", str(tmp_path))
    cpu_build.library.cache_clear()
    yield tmp_path
    cpu_build.library.cache_clear()


def test_build_is_cached_by_content(fresh_build: Path) -> None:
    assert cpu_build.library() is not None
    built = list((fresh_build / "kernels").glob("cpu_fused-*.so"))
    assert len(built) == 1 and not list((fresh_build / "kernels").glob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns
    cpu_build.library.cache_clear()
    assert cpu_build.library() is not None
    assert built[0].stat().st_mtime_ns == stamp


def test_switch_and_missing_compiler(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_build.SWITCH, "0")
    assert cpu_build.library() is None
    monkeypatch.setenv(cpu_build.SWITCH, "sometimes")
    cpu_build.library.cache_clear()
    with pytest.raises(cpu_build.KernelBuildError, match="MUXTUNE_CPU_KERNELS must be auto, 0 or 1"):
        cpu_build.library()
    monkeypatch.setenv("CC", str(fresh_build / "no-such-compiler"))
    monkeypatch.setenv(cpu_build.SWITCH, "auto")
    cpu_build.library.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu_build.library() is None
    assert any("no C compiler" in str(w.message) for w in caught)
    monkeypatch.setenv(cpu_build.SWITCH, "1")
    cpu_build.library.cache_clear()
    with pytest.raises(cpu_build.KernelBuildError, match="could not be built"):
        cpu_build.library()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 5), (9, 1031), (3, 49152)])
def test_cross_entropy_rows_matches_log_softmax_and_its_backward(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    rows, vocab = shape
    generator = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(shape, generator=generator) * 6).to(dtype)
    targets = torch.randint(vocab, (rows,), generator=generator)
    scale = 1 / 37
    picked, grad = cpu_fused.cross_entropy_rows(logits, targets, scale, with_grad=True)

    log_probs = torch.log_softmax(logits.float(), dim=-1)
    expected_picked = log_probs.gather(1, targets[:, None])[:, 0]
    upstream = torch.zeros_like(log_probs).scatter_(1, targets[:, None], -scale)
    expected_grad = torch.ops.aten._log_softmax_backward_data(upstream, log_probs, 1, torch.float32).to(dtype)
    assert picked.dtype == torch.float32 and grad is not None and grad.dtype == dtype
    torch.testing.assert_close(picked, expected_picked, rtol=1e-6, atol=1e-5)
    assert_one_rounding(grad, expected_grad)
    without, no_grad = cpu_fused.cross_entropy_rows(logits, targets, scale, with_grad=False)
    assert no_grad is None and torch.equal(without, picked)


def test_cross_entropy_rows_propagate_nan() -> None:
    logits = torch.randn(2, 40)
    logits[1, 3] = float("nan")
    picked, grad = cpu_fused.cross_entropy_rows(logits, torch.tensor([0, 5]), 1.0, with_grad=True)
    assert torch.isfinite(picked[0]) and torch.isnan(picked[1])
    assert torch.isfinite(grad[0]).all() and torch.isnan(grad[1]).all()
