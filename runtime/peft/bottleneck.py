"""Bottleneck adapters: the serial attachment kind, `y = h + up(act(down(h)))` with `h` the frozen
operator's output.

Houlsby adapters sit after each block's attention output projection and MLP output projection,
Pfeiffer adapters after the MLP output projection only. The attach points are fixed per backbone
family (`ATTACH_POINTS`). The adapter starts as the identity (`up` is zero). Adapter directories
use peft's two files with peft_type `MUXTUNE_ADAPTER` (docs/adapter-format.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from muxtune.specs import AdapterSpec
from muxtune.specs.peft import ADAPTER_ACTIVATIONS, ADAPTER_VARIANTS

from ..sharding import full_features, host_shard, summed_over_shards
from .base import AttachmentKind, OperatorPeftModule, uniform_init_
from .registry import (
    AdapterError,
    AdapterFiles,
    AttachContext,
    ExportContext,
    PeftAttachError,
    PeftMethod,
    attach_operator_modules,
    config_field,
    find_anchors,
    positive_int_field,
    prefixed_tensors,
    unprefixed_state,
)

PEFT_TYPE = "MUXTUNE_ADAPTER"

ATTACH_POINTS: dict[str, tuple[str, str]] = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "opt": ("self_attn.out_proj", "fc2"),
}
"""Per backbone family: (attention output projection, MLP output projection) of every block,
as dotted suffixes of the module names."""

PARAM_NAMES: tuple[str, ...] = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")


def adapter_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The adapter's non-linearity: transformers' ACT2FN[name], or tanh."""
    if name == "tanh":
        return torch.tanh
    from ..models.layers import activation  # the backbone modules import this package

    return activation(name)


def adapter_targets(family: str, variant: str) -> tuple[str, ...]:
    """The module-name suffixes a variant attaches to in a backbone family."""
    attention_out, mlp_out = ATTACH_POINTS[family]
    return (attention_out, mlp_out) if variant == "houlsby" else (mlp_out,)


class BottleneckAdapter(OperatorPeftModule):
    """`h + up(act(down(h)))` on the output `h` of a frozen operator with `features` outputs."""

    kind = AttachmentKind.SERIAL

    def __init__(
        self,
        features: int,
        bottleneck_size: int,
        non_linearity: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.non_linearity = non_linearity
        self.act = adapter_activation(non_linearity)
        self.adapter_down = nn.Linear(features, bottleneck_size, bias=True, dtype=dtype, device=device)
        self.adapter_up = nn.Linear(bottleneck_size, features, bias=True, dtype=dtype, device=device)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """`down.weight` ~ kaiming_uniform(a=sqrt(5)) drawn from `generator` (LoRA's A init);
        biases and `up.weight` zero, so the adapter starts as the identity."""
        fan_in = self.adapter_down.weight.shape[1]
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform with a=sqrt(5) reduces to this
        with torch.no_grad():
            uniform_init_(self.adapter_down.weight, bound, generator)
            self.adapter_down.bias.zero_()
            self.adapter_up.weight.zero_()
            self.adapter_up.bias.zero_()

    def shard_dims(self, style: str) -> dict[str, int | None] | None:
        """At a row-parallel host (where the attach points are): whole, each parameter's gradient
        a partial sum (see `adapt`)."""
        return {name: None for name, _ in self.named_parameters()} if style == "row" else None

    def adapt(self, x: Tensor, y: Tensor, host: nn.Module) -> Tensor:
        """``y + up(act(down(y)))``. At a row-parallel host ``y`` is this shard's partial output:
        the adapter runs on the whole output (summed over the shards) and each of the T shards
        adds a T-th of its result, so the shards' outputs sum to the unsplit one."""
        shard = host_shard(host)
        whole = y if shard is None else summed_over_shards(y)
        delta = self.adapter_up(self.act(self.adapter_down(whole.to(self.adapter_down.weight.dtype))))
        if shard is not None:
            delta = delta / shard.split.size
        return y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        return f"non_linearity={self.non_linearity}"


def attach_adapter(spec: AdapterSpec, ctx: AttachContext) -> dict[str, nn.Module]:
    """One bottleneck adapter per attach point of the spec's variant, in model order."""
    family = getattr(getattr(ctx.model, "config", None), "family", None)
    if family not in ATTACH_POINTS:
        raise PeftAttachError("variant", f"bottleneck adapters have no attach points in a {family!r} backbone")
    anchors = find_anchors(ctx.model, adapter_targets(family, spec.variant))
    if not anchors:
        raise PeftAttachError("variant", f"the model has no {spec.variant} attach points ({family} family)")
    return attach_operator_modules(
        ctx,
        anchors,
        lambda _, host: BottleneckAdapter(
            full_features(host)[1], spec.bottleneck_size, spec.non_linearity, dtype=ctx.dtype, device=ctx.device
        ),
    )


def export_adapter(spec: AdapterSpec, state: Mapping[str, Tensor], ctx: ExportContext) -> AdapterFiles:
    """peft's two files with the adapter's own peft_type and spec fields."""
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": ctx.base_model,
        "variant": spec.variant,
        "bottleneck_size": spec.bottleneck_size,
        "non_linearity": spec.non_linearity,
        "inference_mode": True,
    }
    return config, prefixed_tensors(state)


def check_adapter_tensors(state: Mapping[str, Tensor], bottleneck_size: int, weights: Path) -> None:
    """Every tensor is one of an adapter's four parameters, with the configured bottleneck width."""
    if not state:
        raise AdapterError(f"{weights}: no adapter tensors")
    for key, value in state.items():
        param = next((p for p in PARAM_NAMES if key.endswith("." + p)), None)
        if param is None:
            raise AdapterError(f"{weights}: tensor {key!r} is not one of {', '.join(PARAM_NAMES)}")
        width = {"adapter_down.weight": 0, "adapter_down.bias": 0, "adapter_up.weight": 1}.get(param)
        ndim = 1 if param.endswith(".bias") else 2
        if value.dim() != ndim or (width is not None and value.shape[width] != bottleneck_size):
            raise AdapterError(
                f"{weights}: tensor {key!r} has shape {tuple(value.shape)}, "
                f"which does not fit bottleneck_size {bottleneck_size}"
            )


def load_adapter(raw: dict[str, Any], tensors: dict[str, Tensor], path: Path) -> tuple[AdapterSpec, dict]:
    """A `MUXTUNE_ADAPTER` directory's config (`path`) and state."""
    variant = config_field(raw, "variant", path, lambda v: v in ADAPTER_VARIANTS, f"one of {list(ADAPTER_VARIANTS)}")
    bottleneck_size = positive_int_field(raw, "bottleneck_size", path)
    non_linearity = config_field(
        raw, "non_linearity", path, lambda v: v in ADAPTER_ACTIVATIONS, f"one of {list(ADAPTER_ACTIVATIONS)}"
    )
    weights = path.with_name("adapter_model.safetensors")
    state = unprefixed_state(tensors, weights)
    check_adapter_tensors(state, bottleneck_size, weights)
    spec = AdapterSpec(variant=variant, bottleneck_size=bottleneck_size, non_linearity=non_linearity)
    return spec, state


ADAPTER = PeftMethod(
    name="adapter",
    spec_type=AdapterSpec,
    peft_types=(PEFT_TYPE,),
    attach=attach_adapter,
    export=export_adapter,
    load=load_adapter,
)
