"""The partition as plan data (`plans.Partition`) and as the description the partition pass
writes and `rebuild_partition` checks a rank's model against: the two directions in one place."""

from __future__ import annotations

from muxtune.plans import Partition, Subgraph

from .subgraphs import PartitionDescription, SubgraphDescription

_SHARED_FIELDS = ("id", "kind", "first_node", "last_node", "num_nodes", "digest", "inputs", "outputs")


def plan_partition(description: PartitionDescription, stage: int = 0) -> Partition:
    """The partition pass's description as plan data, every subgraph on ``stage``."""
    return Partition(
        policy=description.policy,
        inputs=description.inputs,
        outputs=description.outputs,
        subgraphs=tuple(
            Subgraph(
                **{name: getattr(sub, name) for name in _SHARED_FIELDS},
                stage=stage,
                first_layer=sub.layers[0],
                last_layer=sub.layers[1],
            )
            for sub in description.subgraphs
        ),
    )


def partition_description(partition: Partition, num_layers: int) -> PartitionDescription:
    """The `PartitionDescription` a plan's `Partition` stands for."""
    return PartitionDescription(
        policy=partition.policy,
        num_layers=num_layers,
        inputs=partition.inputs,
        outputs=partition.outputs,
        subgraphs=tuple(
            SubgraphDescription(
                **{name: getattr(sub, name) for name in _SHARED_FIELDS},
                layers=(sub.first_layer, sub.last_layer),
            )
            for sub in partition.subgraphs
        ),
    )
