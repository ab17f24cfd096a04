"""Bias tuning: the bias attachment kind, `y = base(x) + b_task` with a learned per-task bias delta
on the outputs of the operators `target_modules` selects (peft's suffix rule).

The delta starts at zero, so the task starts at the frozen backbone. Adapter directories use
peft's two files with peft_type `MUXTUNE_BIAS` (docs/adapter-format.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from muxtune.specs import BiasSpec

from ..sharding import full_features, parameter_shard
from .base import AttachmentKind, OperatorPeftModule
from .registry import (
    AdapterError,
    AdapterFiles,
    AttachContext,
    ExportContext,
    PeftMethod,
    attach_operator_modules,
    module_list,
    prefixed_tensors,
    targeted_anchors,
    unprefixed_state,
)

PEFT_TYPE = "MUXTUNE_BIAS"
PARAM_NAME = "bias_delta"


class BiasDelta(OperatorPeftModule):
    """A learned bias added to the output of a frozen operator with `out_features` outputs."""

    kind = AttachmentKind.BIAS

    def __init__(
        self, out_features: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__()
        self.bias_delta = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Zero: the task starts at the frozen operator (no randomness is drawn)."""
        with torch.no_grad():
            self.bias_delta.zero_()

    def shard_dims(self, style: str) -> dict[str, int | None] | None:
        """Split with a column-parallel host's outputs; whole at a row-parallel host, where shard
        0 alone adds it to the partial outputs (so its gradient is a partial sum)."""
        return {"bias_delta": 0 if style == "column" else None}

    def adapt(self, x: Tensor, y: Tensor, host: nn.Module) -> Tensor:
        shard = parameter_shard(self.bias_delta)
        if shard is not None and shard.dim is None and shard.split.index != 0:
            return y
        return y + self.bias_delta.to(y.dtype)

    def extra_repr(self) -> str:
        return f"out_features={self.bias_delta.shape[0]}"


def attach_bias(spec: BiasSpec, ctx: AttachContext) -> dict[str, nn.Module]:
    """One bias delta per targeted operator."""
    return attach_operator_modules(
        ctx,
        targeted_anchors(ctx.model, spec.target_modules),
        lambda _, host: BiasDelta(full_features(host)[1], dtype=ctx.dtype, device=ctx.device),
    )


def export_bias(spec: BiasSpec, state: Mapping[str, Tensor], ctx: ExportContext) -> AdapterFiles:
    """peft's two files with bias tuning's own peft_type and spec fields."""
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": ctx.base_model,
        "target_modules": sorted(spec.target_modules),
        "inference_mode": True,
    }
    return config, prefixed_tensors(state)


def check_bias_tensors(state: Mapping[str, Tensor], weights: Path) -> None:
    """Every tensor is a one-dimensional `bias_delta`."""
    if not state:
        raise AdapterError(f"{weights}: no bias tensors")
    for key, value in state.items():
        if not key.endswith("." + PARAM_NAME):
            raise AdapterError(f"{weights}: tensor {key!r} is not a {PARAM_NAME}")
        if value.dim() != 1:
            raise AdapterError(f"{weights}: tensor {key!r} has shape {tuple(value.shape)}, expected one dimension")


def load_bias(raw: dict[str, Any], tensors: dict[str, Tensor], path: Path) -> tuple[BiasSpec, dict]:
    """A `MUXTUNE_BIAS` directory's config (`path`) and state."""
    spec = BiasSpec(target_modules=module_list(raw, "target_modules", path))
    weights = path.with_name("adapter_model.safetensors")
    state = unprefixed_state(tensors, weights)
    check_bias_tensors(state, weights)
    return spec, state


BIAS = PeftMethod(
    name="bias",
    spec_type=BiasSpec,
    peft_types=(PEFT_TYPE,),
    attach=attach_bias,
    export=export_bias,
    load=load_bias,
)
