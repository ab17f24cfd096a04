"""torch.fx tracing of a backbone with PEFT hosts kept as leaf modules.

The micro-batch layout is a graph input like the token ids: hosts (linear operators, the token
embedding and packed attention) receive it as an argument.
"""

from __future__ import annotations

import torch.fx
from torch import Tensor, nn

from .layout import MicroBatchLayout
from .peft import PeftHost


class PeftLeafTracer(torch.fx.Tracer):
    """A tracer that keeps PEFT hosts opaque: their per-task dispatch is data-dependent.
    Buffers (rotary tables) are read from the model, not copied into the graph as constants."""

    proxy_buffer_attributes = True

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, PeftHost) or super().is_leaf_module(module, qualified_name)


class HiddenStates(nn.Module):
    """A backbone's final hidden states (everything before the head) as a module's forward."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids_T: Tensor, position_ids_T: Tensor, layout: MicroBatchLayout) -> Tensor:
        return self.backbone.hidden_states(input_ids_T, position_ids_T, layout)


def trace_backbone(model: nn.Module, *, head: bool = True) -> torch.fx.GraphModule:
    """Symbolically trace `model.forward` (logits), or with ``head=False`` its hidden states
    (what training partitions: the loss applies the head per task on scored rows only); PEFT
    hosts appear as `call_module` nodes."""
    root = model if head else HiddenStates(model)
    graph = PeftLeafTracer().trace(root)
    return torch.fx.GraphModule(root, graph, class_name=type(model).__name__)
