"""Executable partitions: subgraph modules built from a partition description, run in sequence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from ..tracing import trace_backbone
from .subgraphs import (
    GraphFacts,
    PartitionDescription,
    PartitionPolicy,
    SubgraphDescription,
    describe,
    match_description,
)


@dataclass(frozen=True)
class Subgraph:
    """One executable subgraph: its description and a GraphModule that takes the values named by
    `description.inputs` positionally and returns the tuple of those named by `description.outputs`."""

    description: SubgraphDescription
    module: torch.fx.GraphModule


def _build_module(facts: GraphFacts, sub: SubgraphDescription, run: range) -> torch.fx.GraphModule:
    """A GraphModule of the compute nodes `run` (sharing the traced model's modules and parameters)."""
    by_name = {n.name: n for n in facts.graph_module.graph.nodes}
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {by_name[name]: graph.placeholder(name) for name in sub.inputs}
    for node in facts.compute[run.start : run.stop]:
        for used in node.all_input_nodes:
            if used.op == "get_attr" and used not in env:
                env[used] = graph.node_copy(used)
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env[by_name[name]] for name in sub.outputs))
    return torch.fx.GraphModule(facts.graph_module, graph, class_name=f"Subgraph{sub.id}")


def _drops(description: PartitionDescription) -> list[tuple[str, ...]]:
    """For each subgraph, the values no later subgraph (nor the graph output) reads once it has run."""
    last_use: dict[str, int] = {}
    for sub in description.subgraphs:
        for name in sub.inputs:
            last_use[name] = sub.id
    kept = set(description.outputs)
    drops: list[list[str]] = [[] for _ in description.subgraphs]
    for name, sid in last_use.items():
        if name not in kept:
            drops[sid].append(name)
    return [tuple(names) for names in drops]


class PartitionedGraph:
    """A traced graph cut into subgraphs as `description` says (checked against the graph first);
    calling it runs the subgraphs in sequence, forward, and returns what the graph returns."""

    def __init__(self, gm: torch.fx.GraphModule, description: PartitionDescription) -> None:
        facts, runs = match_description(gm, description)
        self.description = description
        self.graph_module = gm
        self.subgraphs = tuple(
            Subgraph(sub, _build_module(facts, sub, run)) for sub, run in zip(description.subgraphs, runs)
        )
        self._output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        self._drops = _drops(description)

    def __call__(self, *args: Any) -> Any:
        """Run the subgraphs on the graph inputs `args`, holding intermediate values by name."""
        if len(args) != len(self.description.inputs):
            raise TypeError(f"the graph takes {len(self.description.inputs)} inputs, got {len(args)}")
        env: dict[str, Any] = dict(zip(self.description.inputs, args))
        for subgraph, drop in zip(self.subgraphs, self._drops):
            values = subgraph.module(*(env[name] for name in subgraph.description.inputs))
            env.update(zip(subgraph.description.outputs, values))
            for name in drop:
                del env[name]
        return torch.fx.node.map_arg(self._output.args[0], lambda n: env[n.name])


def split_graph(gm: torch.fx.GraphModule, policy: PartitionPolicy) -> PartitionedGraph:
    """Partition `gm` with `policy` (one process: describe and build in one go)."""
    return PartitionedGraph(gm, describe(gm, policy))


def rebuild_partition(model: nn.Module, description: PartitionDescription, *, head: bool = True) -> PartitionedGraph:
    """Re-trace `model` (backbone with its PEFT modules attached) and cut it as `description` says;
    raises `PartitionMismatchError` naming the first difference when the model's graph differs."""
    return PartitionedGraph(trace_backbone(model, head=head), description)
