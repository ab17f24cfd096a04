"""The fused head + cross-entropy against plain torch's, in fp32 and bf16, over several chunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from muxtune.runtime import loss as loss_module
from muxtune.runtime.loss import FrozenHead, linear_cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_matches_cross_entropy_of_the_linear(dtype: torch.dtype, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss_module, "CHUNK_LOGIT_BYTES", 4 * 97 * 16)  # 16 rows per chunk
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(97, 24, generator=generator).to(dtype)
    hidden = torch.randn(rows, 24, generator=generator).to(dtype)
    targets = torch.randint(97, (rows,), generator=generator)
    scale = 1 / 37

    ours = hidden.clone().requires_grad_()
    nll, term = linear_cross_entropy(ours, FrozenHead(weight), targets, scale)
    (3 * term).backward()

    theirs = hidden.clone().requires_grad_()
    expected = F.cross_entropy(F.linear(theirs, weight).float(), targets, reduction="sum")
    (3 * expected * scale).backward()

    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert not nll.requires_grad
    torch.testing.assert_close(nll, expected.detach(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(term.detach(), expected.detach() * scale, rtol=tolerance, atol=tolerance)
    assert ours.grad is not None and ours.grad.dtype == dtype
    torch.testing.assert_close(ours.grad.float(), theirs.grad.float(), rtol=tolerance, atol=tolerance * 0.1)


def test_without_gradients_nothing_is_kept() -> None:
    weight = torch.randn(11, 5)
    with torch.no_grad():
        nll, term = linear_cross_entropy(torch.randn(3, 5), FrozenHead(weight), torch.tensor([0, 4, 10]), 0.5)
    assert float(term) == pytest.approx(0.5 * float(nll))


@pytest.mark.parametrize("rows", [1, 4, 45, 300])
def test_packed_head_products_are_bitwise_the_plain_ones(rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(1031, 64, generator=generator).bfloat16()
    head = FrozenHead(weight)
    assert (head._packed is not None) == loss_module.packs_head("cpu", torch.bfloat16)
    hidden = torch.randn(rows, 64, generator=generator).bfloat16()
    grad = torch.randn(rows, 1031, generator=generator).bfloat16()
    assert torch.equal(head.logits(hidden), F.linear(hidden, weight))
    assert torch.equal(head.hidden_grad(grad), grad @ weight)
