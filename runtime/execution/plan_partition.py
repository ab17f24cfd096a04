"""The plan's partition (plain plan data) as the description `rebuild_partition` checks a
rank's model against."""

from __future__ import annotations

from muxtune.plans import Partition

from .subgraphs import PartitionDescription, SubgraphDescription


def partition_description(partition: Partition, num_layers: int) -> PartitionDescription:
    """The `PartitionDescription` a plan's `Partition` stands for."""
    return PartitionDescription(
        policy=partition.policy,
        num_layers=num_layers,
        inputs=partition.inputs,
        outputs=partition.outputs,
        subgraphs=tuple(
            SubgraphDescription(
                id=sub.id,
                kind=sub.kind,
                layers=(sub.first_layer, sub.last_layer),
                first_node=sub.first_node,
                last_node=sub.last_node,
                num_nodes=sub.num_nodes,
                digest=sub.digest,
                inputs=sub.inputs,
                outputs=sub.outputs,
            )
            for sub in partition.subgraphs
        ),
    )
