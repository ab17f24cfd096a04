"""PEFT hosts on the segmented path (what CUDA runs: every task's LoRA segments at a host in one
`segmented_lora` call) against the per-segment path the CPU runs, forward and backward."""

from __future__ import annotations

import pytest
import torch

from muxtune.kernels import lora_dispatch
from muxtune.runtime.layout import MicroBatchLayout
from muxtune.runtime.models.layers import HostLinear
from muxtune.runtime.peft.dora import DoraModule
from muxtune.runtime.peft.lora import LoraConfig, LoraModule

TASKS = {
    "a": LoraConfig(r=1, alpha=2.0),
    "b": LoraConfig(r=8, alpha=4.0, dropout=0.25),
    "c": LoraConfig(r=5, alpha=5.0),
}
SEQUENCES = (3, 4, 2, 5, 6, 1, 4)
OWNERS = ("a", "a", None, "b", "c", "c", None)


def host_and_input(backbone_dtype: torch.dtype, modules: type = LoraModule) -> tuple[HostLinear, torch.Tensor]:
    """A 12 -> 10 host with the three tasks' modules (B non-zero) and an input of the layout's tokens."""
    generator = torch.Generator().manual_seed(0)
    host = HostLinear(12, 10, bias=True).requires_grad_(False)
    with torch.no_grad():
        host.weight.copy_(torch.randn(host.weight.shape, generator=generator))
        host.bias.copy_(torch.randn(host.bias.shape, generator=generator))
    host.to(backbone_dtype)
    for seed, (task, config) in enumerate(TASKS.items()):
        if modules is DoraModule:
            module = DoraModule(12, 10, config, torch.ones(10), fan_in_fan_out=False)
        else:
            module = LoraModule(12, 10, config)
        module.reset_parameters(torch.Generator().manual_seed(seed))
        with torch.no_grad():
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=generator))
        module.set_dropout_generator(torch.Generator().manual_seed(100 + seed))
        host.add_adapter(task, module)
    x = torch.randn(sum(SEQUENCES), 12, generator=generator).to(backbone_dtype).requires_grad_(True)
    return host, x


def forward_backward(host: HostLinear, x: torch.Tensor) -> list[torch.Tensor]:
    """The host's output and the gradients of x and every adapter weight for a fixed upstream gradient."""
    layout = MicroBatchLayout.for_sequences(SEQUENCES, OWNERS)
    y = host(x, layout)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    weights = list(host.adapters.parameters())
    grads = torch.autograd.grad(y, [x, *weights], upstream)
    return [y.detach(), *grads]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("backbone_dtype", [torch.float32, torch.bfloat16])
def test_segmented_host_matches_per_segment_path(
    backend: str, backbone_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lora_dispatch, "BACKEND", None)
    monkeypatch.delenv(lora_dispatch.BACKEND_ENV, raising=False)
    expected = forward_backward(*host_and_input(backbone_dtype))
    monkeypatch.setattr(lora_dispatch, "BACKEND", backend)
    calls: list[int] = []
    original = lora_dispatch.segmented_lora

    def counted(*args, **kwargs):
        calls.append(len(args[1]))
        return original(*args, **kwargs)

    monkeypatch.setattr("muxtune.runtime.peft.lora.segmented_lora", counted)
    got = forward_backward(*host_and_input(backbone_dtype))
    assert calls == [3], "one segmented call for the host's three tasks"
    # fp32: the same products in another order; bf16: the fused add rounds delta, then the sum
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if backbone_dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for index, (value, reference) in enumerate(zip(got, expected)):
        assert value.dtype == reference.dtype
        torch.testing.assert_close(value, reference, **tolerance, msg=f"output/gradient {index}")


def test_dora_keeps_the_per_segment_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_dispatch, "BACKEND", "torch")
    monkeypatch.setattr("muxtune.runtime.peft.lora.segmented_lora", None)  # a call would fail
    host, x = host_and_input(torch.float32, DoraModule)
    assert all(torch.isfinite(t).all() for t in forward_backward(host, x))
