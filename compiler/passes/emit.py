"""The emit pass: each rank's instruction program, one round body per phase.

On one rank, a round runs each hTask's micro-batches one after another: load the hTask's
global batches, then per micro-batch every subgraph forward, the loss, every subgraph backward
in reverse order and free its buffers; then every active task's optimizer step, and a
checkpoint in the rounds the align pass marked.
"""

from __future__ import annotations

from collections.abc import Sequence

from muxtune.plans import (
    Backward,
    BuildTasks,
    Checkpoint,
    ExportAdapters,
    Forward,
    Free,
    Instruction,
    LoadBackbone,
    LoadBatches,
    LossBackward,
    OptimizerStep,
    Partition,
    Phase,
    RankProgram,
    TaskPlan,
)

from .align import checkpoint_rounds

COMPUTE_STREAM = 0


def round_body(phase: Phase, partition: Partition, tasks: Sequence[TaskPlan]) -> tuple[Instruction, ...]:
    """One round of ``phase`` on a single rank holding every subgraph."""
    body: list[Instruction] = []
    subgraphs = [s.id for s in partition.subgraphs]
    for htask in phase.htasks:
        body.append(LoadBatches(htask=htask.id))
        for mb in range(htask.num_microbatches):
            body += [Forward(htask.id, mb, s, COMPUTE_STREAM) for s in subgraphs]
            body.append(LossBackward(htask.id, mb, COMPUTE_STREAM))
            body += [Backward(htask.id, mb, s, COMPUTE_STREAM) for s in reversed(subgraphs)]
            body.append(Free(htask.id, mb))
    body.append(OptimizerStep(tasks=phase.tasks))
    rounds = checkpoint_rounds(tasks, phase)
    if rounds:
        body.append(Checkpoint(rounds=rounds))
    return tuple(body)


def single_rank_program(
    tasks: Sequence[TaskPlan], phases: Sequence[Phase], partition: Partition, device: str
) -> RankProgram:
    """Rank 0's program: load the backbone and build every task, then the phases' rounds, then
    export the adapters."""
    return RankProgram(
        rank=0,
        device=device,
        stage=0,
        prologue=(LoadBackbone(stage=0), BuildTasks(tasks=tuple(t.name for t in tasks))),
        phases=tuple(round_body(phase, partition, tasks) for phase in phases),
        epilogue=(ExportAdapters(),),
    )
