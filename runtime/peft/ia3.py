"""(IA)^3: the scale attachment kind, learned per-feature scales `ia3_l` as peft's `IA3Layer`.

A target that is not a feedforward module scales the operator's output, bias included:
`y' = base(x) * l` with `l` of shape [O, 1]. A feedforward target scales the operator's input
instead: `y' = base(x * l)` with `l` of shape [1, I]. Both start at ones. A target is a
feedforward module when its full name ends with one of `feedforward_modules` (peft's plain
string-suffix rule, unlike the dotted-suffix rule of `target_modules`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from muxtune.specs import IA3Spec

from ..sharding import full_features
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


class IA3Module(OperatorPeftModule):
    """One operator's (IA)^3 vector; parameter name `ia3_l` and shapes follow peft."""

    kind = AttachmentKind.SCALE

    def __init__(
        self,
        in_features: int,
        out_features: int,
        is_feedforward: bool,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.is_feedforward = is_feedforward
        self.adapts_input = is_feedforward
        shape = (1, in_features) if is_feedforward else (out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=dtype, device=device))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """peft's init: ones (nothing random)."""
        with torch.no_grad():
            self.ia3_l.fill_(1.0)

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_feedforward:
            return x
        return (x.to(self.ia3_l.dtype) * self.ia3_l.flatten()).to(x.dtype)

    def shard_dims(self, style: str) -> dict[str, int | None] | None:
        """Split with the features it scales where the host splits them (outputs of a
        column-parallel host, inputs of a row-parallel one); whole elsewhere, a partial gradient."""
        split_here = (style == "row") == self.is_feedforward
        return {"ia3_l": (1 if self.is_feedforward else 0) if split_here else None}

    def adapt(self, x: torch.Tensor, y: torch.Tensor, host: nn.Module) -> torch.Tensor:
        if self.is_feedforward:
            return y
        return (y * self.ia3_l.flatten()).to(y.dtype)


def is_feedforward(anchor: str, feedforward_modules: tuple[str, ...]) -> bool:
    """peft's `_check_target_module_feedforward` for a list: the name ends with one of them."""
    return any(anchor.endswith(name) for name in feedforward_modules)


def attach_ia3(spec: IA3Spec, ctx: AttachContext) -> dict[str, nn.Module]:
    """One (IA)^3 vector per targeted linear operator."""
    feedforward = tuple(spec.feedforward_modules or ())
    return attach_operator_modules(
        ctx,
        targeted_anchors(ctx.model, spec.target_modules),
        lambda name, host: IA3Module(
            *full_features(host),
            is_feedforward(name, feedforward),
            dtype=ctx.dtype,
            device=ctx.device,
        ),
    )


def export_ia3(spec: IA3Spec, state: Mapping[str, torch.Tensor], ctx: ExportContext) -> AdapterFiles:
    """peft's IA3Config fields and saved keys (`<prefix><anchor>.ia3_l`)."""
    config = {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": ctx.base_model,
        "target_modules": sorted(spec.target_modules),
        "feedforward_modules": sorted(spec.feedforward_modules or ()),
        "exclude_modules": None,
        "fan_in_fan_out": ctx.fan_in_fan_out,
        "init_ia3_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }
    return config, prefixed_tensors(state)


def load_ia3(raw: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> tuple[IA3Spec, dict]:
    """A peft (IA)^3 directory's config and state."""
    targets = module_list(raw, "target_modules", path)
    feedforward = module_list(raw, "feedforward_modules", path, allow_empty=True)
    extra = [name for name in feedforward if name not in targets]
    if extra:
        raise AdapterError(f"{path}: feedforward_modules must be a subset of target_modules, but {extra[0]!r} is not")
    if raw.get("exclude_modules"):
        raise AdapterError(f"{path}: exclude_modules is not supported, got {raw['exclude_modules']!r}")
    state = unprefixed_state(tensors, path)
    for key in state:
        if not key.endswith(".ia3_l"):
            raise AdapterError(f"{path}: tensor {key!r} is not an (IA)^3 vector (`.ia3_l`)")
    return IA3Spec(target_modules=targets, feedforward_modules=feedforward), state


IA3 = PeftMethod(
    name="ia3",
    spec_type=IA3Spec,
    peft_types=("IA3",),
    attach=attach_ia3,
    export=export_ia3,
    load=load_ia3,
)
