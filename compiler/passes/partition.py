"""Pass 2, partition: cut the traced graph into backbone, PEFT and collective subgraphs."""

from __future__ import annotations

import re

import torch.fx

from muxtune.runtime.execution import PartitionDescription, PartitionPolicy, describe, fine, per_layers, per_stage

_PER_LAYERS = re.compile(r"per_layers\((\d+)\)")
_PER_STAGE = re.compile(r"per_stage\((\d+(?:,\d+)*);(\d+)\)")


def policy_from_name(name: str) -> PartitionPolicy:
    """The policy called `name`: "fine", "per_layers(N)" or "per_stage(F0,F1,...;N)" (the names
    descriptions record)."""
    if name == "fine":
        return fine
    match = _PER_LAYERS.fullmatch(name)
    if match is not None:
        return per_layers(int(match.group(1)))
    match = _PER_STAGE.fullmatch(name)
    if match is not None:
        return per_stage(tuple(int(x) for x in match.group(1).split(",")), int(match.group(2)))
    raise ValueError(f"unknown partition policy {name!r}; known: 'fine', 'per_layers(N)', 'per_stage(F0,F1,...;N)'")


def partition(traced: torch.fx.GraphModule, policy: PartitionPolicy) -> PartitionDescription:
    """The plain-data description of `traced` cut by `policy` (deterministic: same graph and
    policy, same description)."""
    description = describe(traced, policy)
    covered = sum(sub.num_nodes for sub in description.subgraphs)
    assert description.subgraphs, "a partition has at least one subgraph"
    assert all(first <= last for first, last in (sub.layers for sub in description.subgraphs))
    assert covered == sum(1 for n in traced.graph.nodes if n.op not in ("placeholder", "get_attr", "output"))
    return description
