"""torch.fx tracing of a backbone with PEFT hosts kept as leaf modules."""

from __future__ import annotations

import torch.fx
from torch import nn

from .peft import AnchoredOperator


class PeftLeafTracer(torch.fx.Tracer):
    """A tracer that keeps PEFT hosts opaque: their per-task dispatch is data-dependent."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, AnchoredOperator) or super().is_leaf_module(module, qualified_name)


def trace_backbone(model: nn.Module) -> torch.fx.GraphModule:
    """Symbolically trace `model.forward`; PEFT hosts appear as `call_module` nodes."""
    graph = PeftLeafTracer().trace(model)
    return torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
