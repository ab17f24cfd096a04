"""torch.fx tracing of a backbone with PEFT hosts kept as leaf modules.

The micro-batch layout is a graph input like the token ids: hosts (linear operators, the token
embedding and packed attention) receive it as an argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx
from torch import Tensor, nn

from .layout import MicroBatchLayout
from .peft import PeftHost


class PeftLeafTracer(torch.fx.Tracer):
    """A tracer that keeps PEFT hosts opaque: their per-task dispatch is data-dependent.
    Buffers (rotary tables) are read from the model, not copied into the graph as constants."""

    proxy_buffer_attributes = True

    def trace(
        self, root: nn.Module | Callable[..., Any], concrete_args: dict[str, Any] | None = None
    ) -> torch.fx.Graph:
        self._tensor_names: dict[int, str] | None = None
        return super().trace(root, concrete_args)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, PeftHost) or super().is_leaf_module(module, qualified_name)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, torch.fx.Proxy]) -> Any:
        """fx's lookup of a parameter or buffer by identity, from a table built once per trace
        (fx scans every parameter on each access: quadratic with many tasks' adapters attached)."""
        if not isinstance(attr_val, Tensor):
            return attr_val
        if self._tensor_names is None:
            self._tensor_names = {}
            for name, tensor in [*self.root.named_parameters(), *self.root.named_buffers()]:
                self._tensor_names.setdefault(id(tensor), name)
        name = self._tensor_names.get(id(attr_val))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]


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
