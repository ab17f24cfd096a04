"""Pass 1, trace: the backbone with every task's PEFT modules attached, traced on the meta device."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx

from muxtune.runtime.execution import carries_peft
from muxtune.runtime.models import BackboneConfig, build_model
from muxtune.runtime.peft import attach_task
from muxtune.runtime.sharding import TensorSplit
from muxtune.runtime.tracing import trace_backbone
from muxtune.specs import PeftSpec


def trace_model(
    backbone: BackboneConfig,
    tasks: Mapping[str, PeftSpec],
    dtype: torch.dtype = torch.float32,
    *,
    head: bool = True,
    split: TensorSplit | None = None,
) -> torch.fx.GraphModule:
    """Build `backbone` on the meta device (no weights), attach each task's PEFT modules in the
    given order and trace it (its logits, or with ``head=False`` its hidden states, where a task
    adapting only the head has no module); PEFT hosts are `call_module` leaves, so the graph is
    the same whichever tasks are attached: one task per distinct PEFT config is. Raises
    ValueError for a task whose target modules match nothing or are never called. With
    ``split``, one tensor-parallel shard is traced (its collectives are graph nodes)."""
    model = build_model(backbone, dtype=dtype, device="meta", split=split)
    representative: dict[PeftSpec, str] = {}
    for name, config in tasks.items():
        representative.setdefault(config, name)
    head_only = set()
    for config, name in representative.items():
        modules = attach_task(model, name, config, seed=0, dropout_generator=torch.Generator(), dtype=dtype)
        if all(anchor == "lm_head" for anchor in modules):
            head_only.add(name)
    traced = trace_backbone(model, head=head)
    called: set[str] = set()
    for node in traced.graph.nodes:
        host = traced.get_submodule(str(node.target)) if node.op == "call_module" else None
        if host is not None and carries_peft(host):
            called.update(host.adapters)
    missing = [
        name
        for name, config in tasks.items()
        if representative[config] not in called and (head or representative[config] not in head_only)
    ]
    if missing:
        raise ValueError(f"tasks {missing}: their PEFT modules are never called by the model's forward pass")
    return traced
