"""torch.fx tracing of a backbone with PEFT hosts kept as leaf modules.

The micro-batch layout is a graph input like the token ids: hosts receive it as an argument, and
attention receives its `cu_seqlens_S1` (`packed_causal_attention` is a wrapped leaf function).
"""

from __future__ import annotations

import torch.fx
from torch import nn

from .peft import PeftHost


class PeftLeafTracer(torch.fx.Tracer):
    """A tracer that keeps PEFT hosts opaque: their per-task dispatch is data-dependent."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, PeftHost) or super().is_leaf_module(module, qualified_name)


def trace_backbone(model: nn.Module) -> torch.fx.GraphModule:
    """Symbolically trace `model.forward`; PEFT hosts appear as `call_module` nodes."""
    graph = PeftLeafTracer().trace(model)
    return torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
