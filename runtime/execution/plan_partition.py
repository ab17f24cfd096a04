"""The partition as plan data (`plans.Partition`) and as the description the partition pass
writes and `rebuild_partition` checks a rank's model against: the two directions in one place."""

from __future__ import annotations

from collections.abc import Callable

from muxtune.plans import Partition, Subgraph

from .subgraphs import PartitionDescription, SubgraphDescription

_SHARED_FIELDS = ("id", "kind", "first_node", "last_node", "num_nodes", "digest", "inputs", "outputs")


def plan_partition(
    description: PartitionDescription, stage: int = 0, *, stage_of: Callable[[int], int] | None = None
) -> Partition:
    """The partition pass's description as plan data: every subgraph on ``stage``, or with
    ``stage_of`` (decoder layer -> pipeline stage, e.g. `stage_of_layer`; layer -1 and
    ``num_layers`` included) on the stage of its layers. ValueError for a subgraph whose layers
    lie on two stages."""
    stages = []
    for sub in description.subgraphs:
        if stage_of is None:
            stages.append(stage)
            continue
        first, last = stage_of(sub.layers[0]), stage_of(sub.layers[1])
        if first != last:
            raise ValueError(
                f"subgraph {sub.id} (layers {sub.layers[0]}..{sub.layers[1]}) crosses from stage {first} to "
                f"stage {last}; cut the graph with a policy that respects the stages (per_stage)"
            )
        stages.append(first)
    return Partition(
        policy=description.policy,
        inputs=description.inputs,
        outputs=description.outputs,
        subgraphs=tuple(
            Subgraph(
                **{name: getattr(sub, name) for name in _SHARED_FIELDS},
                stage=sub_stage,
                first_layer=sub.layers[0],
                last_layer=sub.layers[1],
            )
            for sub, sub_stage in zip(description.subgraphs, stages)
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
