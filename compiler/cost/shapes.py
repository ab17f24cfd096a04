"""What the cost model needs to know of the backbone and of each task, read off the meta-device
model and its traced graph (no hand-written per-family formulas for parameter counts)."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from muxtune.runtime.execution.subgraphs import analyze
from muxtune.runtime.models import BackboneConfig, PackedAttention
from muxtune.runtime.peft import attach_task, detach_task
from muxtune.specs import PeftSpec

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _layer_of(path: str) -> int | None:
    match = _LAYER.search(path)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class ModelShape:
    """The frozen backbone as costs see it. ``layer_matmul_params`` are the 2-D weights of one
    decoder layer (GEMMs), ``output_matmul_params`` those of them past attention (which the
    last layer runs on scored rows only), ``layer_ops`` its eager operators per forward; ``edge_ops`` those
    before the first layer and after the last; ``layer_saved_elements`` what one layer's
    autograd keeps per token (inputs of norms, projections and the MLP's products)."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    layer_matmul_params: int
    output_matmul_params: int
    layer_params: int
    embed_params: int
    head_params: int
    tied_head: bool
    layer_ops: int
    edge_ops: tuple[int, int]
    layer_saved_elements: int
    dtype_bytes: int

    @property
    def attention_width(self) -> int:
        """Query heads x head size: the width of attention's score and value products."""
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class TaskShape:
    """One task's PEFT modules: trainable parameters and host call sites per decoder layer
    (averaged over layers), those outside the layers, parameter tensors in all, the extra
    attention keys prefix tuning adds, and what its modules keep per token per layer."""

    name: str
    method: str
    layer_params: float
    layer_anchors: float
    edge_params: int
    param_tensors: int
    total_params: int
    extra_keys: int
    layer_saved_elements: float


def model_shape(config: BackboneConfig, traced: torch.fx.GraphModule, model: nn.Module, dtype: str) -> ModelShape:
    """The backbone's shape from its config, its parameters (by layer) and its traced graph."""
    matmul: Counter[int] = Counter()
    params: Counter[int] = Counter()
    head_params = embed_params = 0
    for name, p in model.named_parameters():
        if ".peft." in name or "adapters" in name:
            continue
        layer = _layer_of(name)
        if layer is None:
            if "lm_head" in name or name.endswith("head.weight"):
                head_params += p.numel()
            elif p.dim() == 2:
                embed_params += p.numel()
            continue
        params[layer] += p.numel()
        if p.dim() == 2:
            matmul[layer] += p.numel()
    tied = bool(config.tie_word_embeddings)
    if head_params == 0:
        head_params = config.vocab_size * config.hidden_size
    ops = Counter(info.layer for info in analyze(traced).infos)
    kv = config.num_kv_heads or config.num_heads
    head_dim = config.head_dim or config.hidden_size // config.num_heads
    hidden, inter = config.hidden_size, config.intermediate_size
    return ModelShape(
        num_layers=config.num_layers,
        hidden=hidden,
        intermediate=inter,
        num_heads=config.num_heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        vocab=config.vocab_size,
        layer_matmul_params=matmul[0],
        output_matmul_params=_matmul_params_past_attention(traced),
        layer_params=params[0],
        embed_params=embed_params,
        head_params=head_params,
        tied_head=tied,
        layer_ops=ops[0],
        edge_ops=(ops[-1], ops[config.num_layers]),
        layer_saved_elements=6 * hidden + 2 * kv * head_dim + 4 * inter,
        dtype_bytes=DTYPE_BYTES[dtype],
    )


def _matmul_params_past_attention(traced: torch.fx.GraphModule) -> int:
    """2-D weights of the first decoder layer's modules called after its attention."""
    total, past = 0, False
    for node in traced.graph.nodes:
        if node.op != "call_module" or _layer_of(str(node.target)) != 0:
            continue
        module = traced.get_submodule(str(node.target))
        if isinstance(module, PackedAttention):
            past = True
        elif past:
            total += sum(p.numel() for p in module.parameters(recurse=False) if p.dim() == 2)
    return total


def task_shapes(model: nn.Module, tasks: Mapping[str, PeftSpec], num_layers: int) -> dict[str, TaskShape]:
    """Attach each task to the meta-device ``model`` in turn, count what it adds, detach it
    (tasks with equal PEFT configs are counted once)."""
    shapes = {}
    counted: dict[PeftSpec, TaskShape] = {}
    for name, spec in tasks.items():
        if spec in counted:
            shapes[name] = dataclasses.replace(counted[spec], name=name)
            continue
        modules = attach_task(model, name, spec, seed=0, dropout_generator=torch.Generator())
        layer_params = edge_params = tensors = 0
        anchors = 0
        saved = 0.0
        for anchor, module in modules.items():
            count = sum(p.numel() for p in module.parameters())
            tensors += sum(1 for _ in module.parameters())
            if _layer_of(anchor) is None:
                edge_params += count
                continue
            layer_params += count
            anchors += 1
            host = model.get_submodule(anchor)
            saved += getattr(host, "in_features", 0) + getattr(spec, "r", 0)
        detach_task(model, name)
        shapes[name] = TaskShape(
            name=name,
            method=spec.method,
            layer_params=layer_params / num_layers,
            layer_anchors=anchors / num_layers,
            edge_params=edge_params,
            param_tensors=tensors,
            total_params=layer_params + edge_params,
            extra_keys=getattr(spec, "num_virtual_tokens", 0) if spec.method == "prefix_tuning" else 0,
            layer_saved_elements=saved / num_layers,
        )
        counted[spec] = shapes[name]
    return shapes
