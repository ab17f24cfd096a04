"""DoRA (`method: lora`, `use_dora: true`): LoRA with a learned magnitude per output feature.

As peft's `DoraLinearLayer` computes it for a linear operator of weight W [O, I] (GPT-2's Conv1D
stores W transposed, peft's `fan_in_fan_out`):

    n   = ||W + s * B A||  per output row, detached from the graph (DoRA paper, section 4.3)
    g   = m / n
    y'  = y + (g - 1) * base + g * s * B(A(drop(x)))

where `base` is the frozen operator's output without its bias (`y - bias`) when no dropout is
active, else `drop(x) @ W^T` (peft recomputes it from the dropped input, again without bias).
The magnitude `m` starts at ||W|| per row. Its state key is `<anchor>.lora_magnitude_vector.weight`
(peft's parameter name); peft's files store it as `<anchor>.lora_magnitude_vector` (see
`lora.peft_tensor_key` / `lora.state_key`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoraConfig, LoraModule
from .registry import PeftAttachError


class DoraMagnitude(nn.Module):
    """The magnitude vector [O] under peft's module name, so its parameter is
    `lora_magnitude_vector.weight` as in peft's (adapter-name stripped) parameter names."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def host_fan_in_fan_out(host: nn.Module) -> bool:
    """Whether `host` stores its weight as [in, out] (GPT-2's Conv1D) rather than [out, in]."""
    if isinstance(host, nn.Linear):
        return False
    shape = tuple(host.weight.shape)
    if shape == (host.in_features, host.out_features):
        return True
    raise PeftAttachError(
        "use_dora",
        f"DoRA supports linear operators only; {type(host).__name__} has a weight of shape {shape}",
    )


def oriented_weight(host: nn.Module, fan_in_fan_out: bool) -> torch.Tensor:
    """The host's frozen weight as [O, I] (peft's `transpose(weight, fan_in_fan_out)`)."""
    return host.weight.t() if fan_in_fan_out else host.weight


def initial_magnitude(host: nn.Module, fan_in_fan_out: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """peft's initial magnitude: the row norms of the base weight, in its dtype (B = 0 at init).
    A meta backbone (the compiler's shape checks) gets ones of the right shape."""
    weight = oriented_weight(host, fan_in_fan_out)
    if weight.is_meta:
        return torch.ones(weight.shape[0], dtype=dtype, device=device)
    with torch.no_grad():
        norm = torch.linalg.norm(weight, dim=1).to(weight.dtype)
    return norm.to(device=device, dtype=dtype)


class DoraModule(LoraModule):
    """LoRA's `lora_A`, `lora_B` (initialized as LoRA) plus the magnitude vector, adapting a
    linear operator as peft's DoRA does."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: LoraConfig,
        magnitude: torch.Tensor,
        *,
        fan_in_fan_out: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(in_features, out_features, config, dtype=dtype, device=device)
        if tuple(magnitude.shape) != (out_features,):
            raise ValueError(f"magnitude has shape {tuple(magnitude.shape)}, expected ({out_features},)")
        self.fan_in_fan_out = fan_in_fan_out
        self._initial_magnitude = magnitude.detach().clone()
        self.lora_magnitude_vector = DoraMagnitude(magnitude.detach().clone().to(device=device, dtype=dtype))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """LoRA's init (A random, B = 0) and the magnitude back to the base weight's row norms."""
        super().reset_parameters(generator)
        with torch.no_grad():
            self.lora_magnitude_vector.weight.copy_(self._initial_magnitude)

    def shard_dims(self, style: str) -> dict[str, int | None] | None:
        """None: the weight norm needs whole rows of the frozen weight and of B A, which a
        row-parallel host splits; DoRA runs on hosts every rank holds whole only."""
        return None

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s * B A|| per output row, outside the autograd graph (peft's `get_weight_norm`)."""
        with torch.no_grad():
            lora_weight = (self.lora_B.weight @ self.lora_A.weight).to(weight.dtype)
            return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).to(weight.dtype)

    def adapt(self, x: torch.Tensor, y: torch.Tensor, host: nn.Module) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        weight = oriented_weight(host, self.fan_in_fan_out).to(x.dtype)
        scale = (self.lora_magnitude_vector.weight / self.weight_norm(weight)).view(1, -1)
        if self.config.dropout == 0.0 or not self.training:
            base = y if host.bias is None else y - host.bias
        else:
            x = self.dropout(x)
            base = F.linear(x, weight)
        lora = self.lora_B(self.lora_A(x))
        return (y + ((scale - 1) * base + scale * lora * self.scaling)).to(y.dtype)
