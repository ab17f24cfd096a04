"""`ParallelLora` against autograd of the expression it stands for: outputs and every gradient
bitwise equal where its rank-wide products run as autograd's (fp32 activations, ranks 1 and
multiples of 16), and equal up to the order of the sums where they run transposed (`narrow_mm`)
or on the CPU LoRA kernels (bf16 activations; with dropout, its fp32 copy of the input), with and
without dropout, at scaling 1 and not."""

from __future__ import annotations

import pytest
import torch

from muxtune.kernels import cpu_lora
from muxtune.kernels.cpu_build import library
from muxtune.runtime.peft.lora import VECTOR_FLOATS, LoraConfig, LoraModule, narrow_mm


def _expression(module: LoraModule, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """peft's LoRA as plain autograd sees it (dropout included)."""
    h = module.lora_A(module.dropout(x.to(module.lora_A.weight.dtype)))
    return torch.addmm(y.to(h.dtype), h, module.lora_B.weight.t(), alpha=module.scaling).to(y.dtype)


def _run(adapt, module: LoraModule, dtype: torch.dtype, rows: int, dropout_seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    packed = torch.randn(rows + 3, module.lora_A.in_features, generator=generator).to(dtype).requires_grad_()
    x = packed.split([3, rows])[1]  # a host's piece: a view into the packed buffer
    y = torch.randn(rows, module.lora_B.out_features, generator=generator).to(dtype).requires_grad_()
    grad_out = torch.randn(rows, module.lora_B.out_features, generator=generator).to(dtype)
    module.set_dropout_generator(torch.Generator().manual_seed(dropout_seed))
    module.zero_grad(set_to_none=True)
    out = adapt(module, x, y)
    out.backward(grad_out)
    return [out.detach(), packed.grad, y.grad, module.lora_A.weight.grad, module.lora_B.weight.grad]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("rank", "alpha", "dropout", "rows"),
    [(8, 16, 0.0, 37), (1, 1, 0.0, 5), (16, 7, 0.0, 100), (4, 8, 0.25, 20), (32, 64, 0.25, 20)],
)
def test_equal_to_autograd_of_the_expression(
    dtype: torch.dtype, rank: int, alpha: float, dropout: float, rows: int
) -> None:
    module = LoraModule(48, 40, LoraConfig(r=rank, alpha=alpha, dropout=dropout))
    module.reset_parameters(torch.Generator().manual_seed(1))
    with torch.no_grad():
        module.lora_B.weight.normal_(generator=torch.Generator().manual_seed(2))  # B = 0 would hide A's gradient
    module.train()
    ours = _run(lambda m, x, y: m.adapt(x, y, None), module, dtype, rows, dropout_seed=3)
    theirs = _run(_expression, module, dtype, rows, dropout_seed=3)
    on_kernels = dtype == torch.bfloat16 and library() is not None
    bitwise = not on_kernels and (rank == 1 or rank % VECTOR_FLOATS == 0)
    for name, a, b in zip(("output", "x grad", "y grad", "A grad", "B grad"), ours, theirs):
        assert a.dtype == b.dtype, name
        if bitwise:
            assert torch.equal(a, b), name
        else:  # a few roundings of the tensor's largest entries (entries near 0 differ relatively more)
            scale = 4 * torch.finfo(a.dtype).eps * b.abs().max().item()
            torch.testing.assert_close(a, b, rtol=0, atol=scale, msg=name)


@pytest.mark.parametrize(("rows", "inner", "width"), [(37, 48, 8), (5, 40, 3), (100, 1536, 24), (20, 576, 16)])
def test_narrow_products_are_the_plain_products_and_run_transposed_off_the_vector_width(
    rows: int, inner: int, width: int
) -> None:
    generator = torch.Generator().manual_seed(4)
    left = torch.randn(rows, inner, generator=generator)
    right = torch.randn(width, inner, generator=generator).t()  # a weight's transpose, as LoRA passes it
    product = narrow_mm(left, right)
    torch.testing.assert_close(product, left.mm(right))
    transposed = width % VECTOR_FLOATS != 0
    assert product.stride() == ((1, rows) if transposed else (width, 1))


def test_frozen_inputs_get_no_gradient() -> None:
    module = LoraModule(16, 8, LoraConfig(r=2, alpha=4))
    x, y = torch.randn(4, 16), torch.randn(4, 8)
    module.adapt(x, y, None).sum().backward()
    assert x.grad is None and y.grad is None
    assert module.lora_A.weight.grad is not None and module.lora_B.weight.grad is not None


@pytest.mark.skipif(library() is None, reason="no C compiler for the CPU kernels")
def test_dropout_on_a_bf16_backbone_runs_on_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout's fp32 copy of the input still has the output's expansion on the kernels."""
    calls: list[torch.Size] = []
    expand = cpu_lora.expand

    def counting_expand(h: torch.Tensor, *rest: object) -> torch.Tensor:
        calls.append(h.shape)
        return expand(h, *rest)

    monkeypatch.setattr(cpu_lora, "expand", counting_expand)
    module = LoraModule(48, 40, LoraConfig(r=8, alpha=16, dropout=0.25))
    module.reset_parameters(torch.Generator().manual_seed(1))
    module.train()
    _run(lambda m, x, y: m.adapt(x, y, None), module, torch.bfloat16, 20, dropout_seed=3)
    assert calls == [torch.Size([20, 8])]
