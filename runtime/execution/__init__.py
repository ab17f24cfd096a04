"""Execution of partitioned backbone graphs: subgraph descriptions, partition policies, runners."""

from .runner import PartitionedGraph, Subgraph, rebuild_partition, split_graph
from .subgraphs import (
    KINDS,
    Kind,
    NodeInfo,
    PartitionDescription,
    PartitionMismatchError,
    PartitionPolicy,
    SubgraphDescription,
    carries_peft,
    collective,
    describe,
    fine,
    is_collective,
    match_description,
    per_layers,
    per_stage,
    stage_of_layer,
)

__all__ = [
    "KINDS",
    "Kind",
    "NodeInfo",
    "PartitionDescription",
    "PartitionMismatchError",
    "PartitionPolicy",
    "PartitionedGraph",
    "Subgraph",
    "SubgraphDescription",
    "carries_peft",
    "collective",
    "describe",
    "fine",
    "is_collective",
    "match_description",
    "per_layers",
    "per_stage",
    "rebuild_partition",
    "split_graph",
    "stage_of_layer",
]
