"""Rank numbering of a plan's device mesh: ``rank = tp_index + T * (stage + S * replica)`` for S
pipeline stages and T tensor-parallel shards (the shards of a stage are consecutive, then the
stages of one replica, then the replicas). Shared by the compiler, which emits per-rank
programs, and the runtime, which builds process groups from the same numbering."""

from __future__ import annotations

from dataclasses import dataclass

from .schema import Placement


@dataclass(frozen=True)
class MeshPosition:
    """Where a rank sits in the mesh."""

    stage: int
    tp_index: int
    replica: int


def rank_of(placement: Placement, position: MeshPosition) -> int:
    """The rank at ``position``."""
    t, s = placement.tensor_parallel, placement.pipeline_parallel
    return position.tp_index + t * (position.stage + s * position.replica)


def position_of(placement: Placement, rank: int) -> MeshPosition:
    """The mesh position of ``rank``."""
    t, s = placement.tensor_parallel, placement.pipeline_parallel
    return MeshPosition(stage=(rank // t) % s, tp_index=rank % t, replica=rank // (t * s))
