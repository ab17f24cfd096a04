"""The task optimizer against torch.optim.AdamW: the same parameters bit for bit, state dicts
that load either way, and no torch._dynamo import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from muxtune.runtime.optimizer import AdamW


def _parameters(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(8, 24), (24, 8), (5,), (0, 3)]
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def _gradients(params: list[torch.nn.Parameter], step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for index, param in enumerate(params):
        # the third parameter gets no gradient on odd steps: it is skipped, as torch skips it
        skip = index == 2 and step % 2 == 1
        param.grad = None if skip else torch.randn(param.shape, generator=generator) * (step + 1)


def _train(optimizer, params: list[torch.nn.Parameter], steps: range) -> None:
    for step in steps:
        _gradients(params, step)
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 / (1 + step)  # a schedule sets the group's lr before each step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_updates_equal_torch_adamw_bitwise(weight_decay: float) -> None:
    ours, theirs = _parameters(0), _parameters(0)
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": weight_decay}
    _train(AdamW(ours, **kwargs), ours, range(6))
    _train(torch.optim.AdamW(theirs, **kwargs), theirs, range(6))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("first", ["ours", "torch"])
def test_state_dicts_load_either_way(first: str) -> None:
    """Three steps with one optimizer, its state dict into the other, three more steps: the
    same parameters as six steps of torch's alone."""
    kinds = {"ours": AdamW, "torch": torch.optim.AdamW}
    second = "torch" if first == "ours" else "ours"
    kwargs = {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05}
    params = _parameters(1)
    before = kinds[first](params, **kwargs)
    _train(before, params, range(3))
    saved = before.state_dict()
    after = kinds[second](params, lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    after.load_state_dict(saved)
    _train(after, params, range(3, 6))

    reference = _parameters(1)
    _train(torch.optim.AdamW(reference, **kwargs), reference, range(6))
    for a, b in zip(params, reference):
        assert torch.equal(a, b)
    assert sorted(saved["state"]) == [0, 1, 2, 3]
    assert sorted(saved["state"][0]) == ["exp_avg", "exp_avg_sq", "step"]


def test_mismatched_state_dict_is_refused() -> None:
    optimizer = AdamW(_parameters(2), lr=1e-3)
    saved = AdamW(_parameters(2)[:3], lr=1e-3).state_dict()
    with pytest.raises(ValueError, match="3 parameters in a group, expected 4"):
        optimizer.load_state_dict(saved)


def test_does_not_import_dynamo() -> None:
    code = (
        "import sys, torch\n"
        "from muxtune.runtime.optimizer import AdamW\n"
        "p = torch.nn.Parameter(torch.ones(3)); o = AdamW([p], lr=0.1)\n"
        "p.grad = torch.ones(3); o.step(); o.zero_grad(); o.load_state_dict(o.state_dict())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
