"""The compute half of the plan interpreter: micro-batch buffers and the subgraph-level
forward, loss and backward instructions.

Buffers are held per (hTask, micro-batch) and named by graph value, as the plan's instructions
name them. A subgraph's floating-point inputs coming from earlier subgraphs are detached into
leaves, so its backward can run on its own: `Backward` back-propagates the subgraph's outputs
with their accumulated gradients and hands the leaves' gradients to the subgraphs that produced
them. Several micro-batches can be in flight at once: nothing is shared between them but the
model's parameters.

Legend: T tokens of the packed buffer, C hidden size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import _engine_run_backward

from muxtune.plans import Backward, Forward, Free, LossBackward, RecordEvent, WaitEvent

from ..engine import MultiTaskEngine
from ..layout import host_to_device
from ..packing import MicroBatch
from .runner import PartitionedGraph
from .streams import StreamSet


@dataclass
class MicroBatchBuffers:
    """Everything one in-flight micro-batch holds."""

    batch: MicroBatch
    values: dict[str, Any] = field(default_factory=dict)
    outputs: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    leaves: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.batch.num_tokens == 0


def _needs_grad(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


class SubgraphInterpreter:
    """Runs `Forward`, `LossBackward`, `Backward`, `Free` and the event instructions on the
    partitioned backbone of this rank; the forward and backward of collective subgraphs run
    inside ``guard()`` (what turns a failed exchange into an error naming the rank)."""

    def __init__(
        self,
        graph: PartitionedGraph,
        engine: MultiTaskEngine,
        streams: StreamSet,
        guard: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        self.graph = graph
        self.engine = engine
        self.streams = streams
        self.guard = guard
        self.device = engine.device
        self.buffers: dict[tuple[int, int], MicroBatchBuffers] = {}
        self.final_output = graph.description.outputs[0]

    def handlers(self) -> Mapping[type, Callable[[Any], None]]:
        """This half's entries of the executor's handler table."""
        return {
            Forward: self.forward,
            LossBackward: self.loss_backward,
            Backward: self.backward,
            Free: self.free,
            RecordEvent: lambda ins: self.streams.record(ins.event, ins.stream),
            WaitEvent: lambda ins: self.streams.wait(ins.event, ins.stream),
        }

    def load(self, htask: int, microbatches: list[MicroBatch], stream: int) -> None:
        """Install an hTask's micro-batches of this round (moved to the device once each, on the
        hTask's ``stream``)."""
        with self.streams.on(stream):
            self._install(htask, microbatches)

    def _install(self, htask: int, microbatches: list[MicroBatch]) -> None:
        for index, mb in enumerate(microbatches):
            buffers = MicroBatchBuffers(mb)
            if not buffers.empty:
                inputs = (
                    host_to_device(mb.input_ids_T, self.device),
                    host_to_device(mb.position_ids_T, self.device),
                    mb.layout,
                )
                buffers.values.update(zip(self.graph.description.inputs, inputs))
            self.buffers[(htask, index)] = buffers

    def forward(self, ins: Forward) -> None:
        buffers = self.buffers[(ins.htask, ins.microbatch)]
        if buffers.empty:
            return
        subgraph = self.graph.subgraphs[ins.subgraph]
        args, leaves = [], {}
        for name in subgraph.description.inputs:
            value = buffers.values[name]
            if _needs_grad(value):
                value = value.detach().requires_grad_(True)
                leaves[name] = value
            args.append(value)
        with self.streams.on(ins.stream), self._guarded(ins.subgraph):
            outputs = subgraph.module(*args)
        buffers.leaves[ins.subgraph] = leaves
        buffers.outputs[ins.subgraph] = outputs
        buffers.values.update(zip(subgraph.description.outputs, outputs))

    def loss_backward(self, ins: LossBackward) -> None:
        buffers = self.buffers[(ins.htask, ins.microbatch)]
        if buffers.empty:
            return
        hidden_TC = buffers.values[self.final_output]
        leaf_TC = hidden_TC.detach().requires_grad_(hidden_TC.requires_grad)
        with self.streams.on(ins.stream):
            total = self.engine.segment_losses(leaf_TC, buffers.batch)
            if total is not None and total.requires_grad:
                total.backward()
        if leaf_TC.grad is not None:
            buffers.grads[self.final_output] = leaf_TC.grad

    def backward(self, ins: Backward) -> None:
        buffers = self.buffers[(ins.htask, ins.microbatch)]
        if buffers.empty:
            return
        names = self.graph.subgraphs[ins.subgraph].description.outputs
        pairs = [
            (out, buffers.grads[name])
            for name, out in zip(names, buffers.outputs.pop(ins.subgraph))
            if _needs_grad(out) and name in buffers.grads
        ]
        leaves = buffers.leaves.pop(ins.subgraph)
        if not pairs:
            return
        with self.streams.on(ins.stream), self._guarded(ins.subgraph):
            backward_from(pairs)
        for name, leaf in leaves.items():
            if leaf.grad is None:
                continue
            previous = buffers.grads.get(name)
            buffers.grads[name] = leaf.grad if previous is None else previous + leaf.grad

    def _guarded(self, subgraph: int) -> AbstractContextManager[None]:
        collective = self.graph.subgraphs[subgraph].description.kind == "collective"
        return self.guard() if collective else contextlib.nullcontext()

    def free(self, ins: Free) -> None:
        del self.buffers[(ins.htask, ins.microbatch)]


def backward_from(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """`torch.autograd.backward` of the outputs with their gradients, gradients accumulated into
    the leaves, without its argument checks: those go through torch.fx's symbolic-shape helpers,
    whose first import (sympy among them) holds the GIL for ~0.3 s in the first round, stalling
    every lane. The gradients here are the next subgraph's input gradients for these very
    outputs, so their shapes, dtypes and devices match by construction."""
    outputs = tuple(out for out, _ in pairs)
    grads = tuple(grad for _, grad in pairs)
    keep_graph = create_graph = False
    allow_unreachable = accumulate_grad = True
    _engine_run_backward(outputs, grads, keep_graph, create_graph, (), allow_unreachable, accumulate_grad)
