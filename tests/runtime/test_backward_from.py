"""The interpreter's backward between subgraphs: the gradients `torch.autograd.backward` gives,
without importing torch.fx's symbolic-shape helpers (sympy) on the first call."""

from __future__ import annotations

import subprocess
import sys

import torch

from muxtune.runtime.execution.interpreter import backward_from


def test_gradients_equal_autograd_backward() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, generator=generator)
    grads_out = [torch.randn(5, 6, generator=generator), torch.randn(5, 4, generator=generator)]
    leaves = []
    for run in (torch.autograd.backward, lambda outs, grads: backward_from(list(zip(outs, grads)))):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
        w = weight.clone().requires_grad_()
        h = x @ w.t()
        run([h.tanh(), h @ w], grads_out)
        leaves.append((x.grad, w.grad))
    for expected, got in zip(*leaves):
        assert torch.equal(expected, got)


def test_first_call_imports_no_symbolic_shapes() -> None:
    code = (
        "import sys, torch\n"
        "from muxtune.runtime.execution.interpreter import backward_from\n"
        "x = torch.ones(3, requires_grad=True)\n"
        "backward_from([(x * 2, torch.ones(3))])\n"
        "assert x.grad.tolist() == [2.0, 2.0, 2.0]\n"
        "print('torch.fx.experimental.symbolic_shapes' in sys.modules, 'sympy' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["False", "False"]
