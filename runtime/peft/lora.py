"""LoRA (and rsLoRA): the parallel attachment kind, `y = base(x) + s * B(A(dropout(x)))`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import AttachmentKind, OperatorPeftModule


@dataclass(frozen=True)
class LoraConfig:
    """One task's LoRA hyperparameters (peft's names in comments)."""

    r: int
    alpha: float  # lora_alpha
    dropout: float = 0.0  # lora_dropout
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) for rsLoRA (peft's definition)."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoraModule(OperatorPeftModule):
    """Low-rank update of a linear operator; parameter names follow peft (`lora_A`, `lora_B`)."""

    kind = AttachmentKind.PARALLEL

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: LoraConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.config = config
        self.scaling = config.scaling
        self.lora_A = nn.Linear(in_features, config.r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(config.r, out_features, bias=False, dtype=dtype, device=device)
        self.dropout_generator: torch.Generator | None = None

    def reset_parameters(self, generator: torch.Generator) -> None:
        """peft's default init: A ~ kaiming_uniform(a=sqrt(5)), B = 0, drawn from `generator`."""
        fan_in = self.lora_A.weight.shape[1]
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform with a=sqrt(5) reduces to this
        with torch.no_grad():
            values = torch.rand(self.lora_A.weight.shape, generator=generator, dtype=torch.float32)
            self.lora_A.weight.copy_(values.mul_(2 * bound).sub_(bound))
            self.lora_B.weight.zero_()

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Inverted dropout drawing its mask from the task's own generator, so a task's masks
        never depend on other tasks (and are restored with the task's checkpoint)."""
        p = self.config.dropout
        if p == 0.0 or not self.training:
            return x
        assert self.dropout_generator is not None, "attach_task sets the task's dropout generator"
        keep = torch.rand(x.shape, generator=self.dropout_generator, device=self.dropout_generator.device) >= p
        return x * keep.to(device=x.device, dtype=x.dtype) / (1.0 - p)

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return y + (delta * self.scaling).to(y.dtype)
