"""Seeded dropout (`muxtune.kernels.dropout`): the CPU kernel against the same mask built with
torch's integer operators and against autograd of eager dropout, bitwise, forward and backward;
the mask's drop rate and independence; seeds drawn from a task's generator."""

from __future__ import annotations

import pytest
import torch

from muxtune.kernels import cpu_build
from muxtune.kernels.dropout import draw_seed, drop_threshold, keep_mask, seeded_dropout

needs_kernels = pytest.mark.skipif(cpu_build.library() is None, reason="no C compiler for the CPU kernels")


def _eager(x: torch.Tensor, p: float, seed: int, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager dropout with the same mask, and its input gradient."""
    leaf = x.clone().requires_grad_()
    keep = keep_mask(x.shape, seed, p, x.device)
    out = leaf.to(torch.float32) * keep.to(torch.float32) / (1.0 - p)
    (grad_x,) = torch.autograd.grad(out, leaf, grad)
    return out, grad_x


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("shape", "p"), [((37, 48), 0.25), ((1, 5), 0.5), ((300, 1001), 0.1), ((0, 4), 0.3)])
def test_kernel_equals_eager_dropout_of_the_same_mask(dtype: torch.dtype, shape: tuple[int, int], p: float) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator).to(dtype)
    grad = torch.randn(*shape, generator=generator)
    seed = 123_456_789_012_345
    leaf = x.clone().requires_grad_()
    out = seeded_dropout(leaf, p, seed, torch.float32)
    (grad_x,) = torch.autograd.grad(out, leaf, grad) if x.numel() else (torch.zeros_like(x),)
    want, want_grad = _eager(x, p, seed, grad) if x.numel() else (x.float(), torch.zeros_like(x))
    assert out.dtype == torch.float32 and grad_x.dtype == dtype
    assert torch.equal(out, want)
    assert torch.equal(grad_x, want_grad)


@needs_kernels
def test_kernel_results_do_not_depend_on_threads() -> None:
    x = torch.randn(700, 999).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = seeded_dropout(x, 0.2, 99, torch.float32)
        torch.set_num_threads(2)
        two = seeded_dropout(x, 0.2, 99, torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_masks_drop_at_the_rate_asked_independently(p: float) -> None:
    count = 1 << 20
    keep = keep_mask((count,), 2024, p, torch.device("cpu")).double()
    sigma = (p * (1 - p) / count) ** 0.5
    assert abs((1 - keep.mean().item()) - p) < 5 * sigma
    both = (keep[:-1] * keep[1:]).mean().item()  # neighbours kept together as often as chance says
    assert abs(both - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / count) ** 0.5
    other = keep_mask((count,), 2025, p, torch.device("cpu")).double()
    assert abs((keep * other).mean().item() - (1 - p) ** 2) < 0.01
    assert drop_threshold(p) / (1 << 24) - p < 2**-24


def test_seeds_come_from_the_task_generator() -> None:
    first, second = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    seeds = [draw_seed(first) for _ in range(3)]
    assert seeds == [draw_seed(second) for _ in range(3)]
    assert len(set(seeds)) == 3


def test_torch_path_where_the_kernel_does_not_apply() -> None:
    x = torch.randn(6, 10, dtype=torch.float64)
    out = seeded_dropout(x, 0.5, 5, torch.float64)
    keep = keep_mask(x.shape, 5, 0.5, x.device)
    assert out.dtype == torch.float64
    assert torch.equal(out, x * keep.double() / 0.5)
