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

from ..sharding import full_features, host_shard, sum_over_shards
from .lora import MAGNITUDE, LoraConfig, LoraModule
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


def row_norms(weight_OI: torch.Tensor, host: nn.Module) -> torch.Tensor:
    """The row norms of a weight-shaped tensor of ``host``, in its dtype: at a row-parallel host
    (input features split over tensor-parallel ranks) the shards' squared norms are summed."""
    shard = host_shard(host)
    if shard is None or shard.style != "row":
        return torch.linalg.norm(weight_OI, dim=1).to(weight_OI.dtype)
    squares = sum_over_shards(weight_OI.float().pow(2).sum(dim=1))
    return squares.sqrt().to(weight_OI.dtype)


def initial_magnitude(host: nn.Module, fan_in_fan_out: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """peft's initial magnitude: the row norms of the base weight, in its dtype (B = 0 at init),
    for every output feature of the unsplit operator (a column-parallel shard fills its own rows
    and leaves the others zero: it keeps only its own). A meta backbone (the compiler's shape
    checks) gets ones of the right shape."""
    weight = oriented_weight(host, fan_in_fan_out)
    out_features = full_features(host)[1]
    if weight.is_meta:
        return torch.ones(out_features, dtype=dtype, device=device)
    with torch.no_grad():
        norm = row_norms(weight, host)
    shard = host_shard(host)
    if shard is not None and shard.style == "column":
        whole = torch.zeros(out_features, dtype=norm.dtype, device=norm.device)
        shard.split.take(whole, 0).copy_(norm)
        norm = whole
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
        """LoRA's split, and the magnitude with the output features: split at a column-parallel
        host, whole at a row-parallel one (where every shard scales its partial outputs)."""
        dims = super().shard_dims(style)
        return None if dims is None else {**dims, f"{MAGNITUDE}.weight": 0 if style == "column" else None}

    def weight_norm(self, weight: torch.Tensor, host: nn.Module) -> torch.Tensor:
        """||W + s * B A|| per output row, outside the autograd graph (peft's `get_weight_norm`);
        summed over the shards of a row-parallel host."""
        with torch.no_grad():
            lora_weight = (self.lora_B.weight @ self.lora_A.weight).to(weight.dtype)
            return row_norms(weight + self.scaling * lora_weight, host)

    def adapt(self, x: torch.Tensor, y: torch.Tensor, host: nn.Module) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        weight = oriented_weight(host, self.fan_in_fan_out).to(x.dtype)
        scale = (self.lora_magnitude_vector.weight / self.weight_norm(weight, host)).view(1, -1)
        if self.config.dropout == 0.0 or not self.training:
            base = y if host.bias is None else y - host.bias
        else:
            x = self.dropout(x)
            base = F.linear(x, weight)
        lora = self.lora_B(self.lora_A(x))
        return (y + ((scale - 1) * base + scale * lora * self.scaling)).to(y.dtype)
