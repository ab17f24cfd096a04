"""The values a partition's subgraphs read and write, and what crosses each cut between them."""

from __future__ import annotations

from dataclasses import dataclass

from .schema import Partition


@dataclass(frozen=True)
class Dataflow:
    """Derived from a valid `Partition` (`Dataflow.of`).

    ``producer[v]`` is the subgraph that outputs value ``v``; ``readers[v]`` are those that
    take it as an input, in order, and for a graph output also `loss` (a reader after the last
    subgraph: the loss reads the graph outputs). Graph inputs come with the micro-batch.
    ``boundaries[b]`` are the values that cross the cut after subgraph ``b`` (produced at or
    before ``b``, read after it): what a `Send` of the activation after ``b`` carries, and
    whose gradients the matching gradient `Send` carries back."""

    stage_of: tuple[int, ...]
    inputs: tuple[tuple[str, ...], ...]
    outputs: tuple[tuple[str, ...], ...]
    graph_outputs: tuple[str, ...]
    producer: dict[str, int]
    readers: dict[str, tuple[int, ...]]
    boundaries: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, partition: Partition) -> Dataflow:
        subgraphs = partition.subgraphs
        loss = len(subgraphs)
        producer = {value: s.id for s in subgraphs for value in s.outputs}
        readers: dict[str, list[int]] = {}
        for s in subgraphs:
            for value in s.inputs:
                readers.setdefault(value, []).append(s.id)
        for value in partition.outputs:
            readers.setdefault(value, []).append(loss)
        boundaries: list[list[str]] = [[] for _ in subgraphs]
        for value, made_by in producer.items():
            for cut in range(made_by, max(readers.get(value, [made_by]))):
                boundaries[cut].append(value)
        return cls(
            stage_of=tuple(s.stage for s in subgraphs),
            inputs=tuple(s.inputs for s in subgraphs),
            outputs=tuple(s.outputs for s in subgraphs),
            graph_outputs=partition.outputs,
            producer=producer,
            readers={value: tuple(ids) for value, ids in readers.items()},
            boundaries=tuple(tuple(values) for values in boundaries),
        )

    @property
    def loss(self) -> int:
        """The reader id that stands for the loss (one past the last subgraph)."""
        return len(self.stage_of)

    def on_stage(self, stage: int) -> tuple[int, ...]:
        """The subgraphs ``stage`` runs, in order."""
        return tuple(i for i, s in enumerate(self.stage_of) if s == stage)
