"""The device mesh of a plan: pipeline stages x tensor-parallel shards x data-parallel replicas.

Ranks are numbered ``rank = tp_index + T * (stage + S * replica)`` for S pipeline stages, T
tensor-parallel shards and D data-parallel replicas: the T shards of a stage are consecutive,
then the stages of one replica, then the replicas. `Stage.ranks` lists a stage's T x D ranks in
increasing order.
"""

from __future__ import annotations

from collections.abc import Sequence

from muxtune.plans import Placement, Stage
from muxtune.plans.mesh import MeshPosition, position_of, rank_of

__all__ = ["MeshPosition", "first_layers", "placement", "position_of", "rank_of"]


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def placement(
    device: str, num_layers: int, stage_layers: Sequence[int], tensor_parallel: int, data_parallel: int
) -> Placement:
    """The placement of ``len(stage_layers)`` pipeline stages, stage s holding the next
    ``stage_layers[s]`` decoder layers (each >= 1, summing to ``num_layers``), each stage on
    ``tensor_parallel`` x ``data_parallel`` ranks (numbered as the module docstring says)."""
    _positive("num_layers", num_layers)
    _positive("tensor_parallel", tensor_parallel)
    _positive("data_parallel", data_parallel)
    if not stage_layers:
        raise ValueError("stage_layers must hold at least one stage")
    for s, count in enumerate(stage_layers):
        _positive(f"stage_layers[{s}]", count)
    if sum(stage_layers) != num_layers:
        raise ValueError(f"stage_layers {list(stage_layers)} must sum to num_layers ({num_layers})")
    num_stages, t, d = len(stage_layers), tensor_parallel, data_parallel
    stages = []
    first = 0
    for s, count in enumerate(stage_layers):
        ranks = tuple(sorted(tp + t * (s + num_stages * r) for r in range(d) for tp in range(t)))
        stages.append(Stage(id=s, ranks=ranks, first_layer=first, last_layer=first + count - 1))
        first += count
    num_ranks = num_stages * t * d
    return Placement(
        device=device,
        num_devices=num_ranks,
        num_ranks=num_ranks,
        pipeline_parallel=num_stages,
        tensor_parallel=t,
        data_parallel=d,
        stages=tuple(stages),
    )


def first_layers(placement: Placement) -> tuple[int, ...]:
    """Each stage's first decoder layer (what `per_stage` and `stage_of_layer` take)."""
    return tuple(stage.first_layer for stage in placement.stages)
