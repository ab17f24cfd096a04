"""Builders for small valid schema-2 plans that plan tests start from: a one-rank plan (three
tasks of different step counts, three phases, two hTasks in the first one, two micro-batches,
three subgraphs, a checkpoint), a two-stage pipeline plan and a two-replica data-parallel plan."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from muxtune.plans import (
    Alignment,
    AllReduce,
    Backward,
    BuildTasks,
    Checkpoint,
    ExportAdapters,
    Forward,
    Free,
    HTask,
    Instruction,
    JobSummary,
    LoadBackbone,
    LoadBatches,
    LossBackward,
    OptimizerStep,
    Partition,
    Phase,
    Placement,
    Plan,
    PlanError,
    Predictions,
    RankProgram,
    RecordEvent,
    Recv,
    Send,
    Stage,
    Subgraph,
    TaskPlan,
    WaitEvent,
    compute_fingerprint,
    plan_from_dict,
    plan_to_dict,
)
from muxtune.specs import DataSpec, LoraSpec, ScheduleSpec

BACKBONE = {
    "name": "tiny-llama",
    "hidden_size": 64,
    "num_layers": 2,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "extra": {"layer_types": ["full", "full"], "note": None},
}


GRAPH_INPUTS = ("input_ids", "position_ids", "layout")


def make_partition(stage_of: Sequence[int] = (0, 0, 0)) -> Partition:
    """Embeddings + layer 0, a LoRA host on layer 1, layer 1 + final norm; ``h0`` is read twice."""
    subgraphs = (
        Subgraph(
            0, "backbone", stage_of[0], -1, 0, "embed_tokens", "add_1", 9, "sha256:" + "0" * 16, GRAPH_INPUTS, ("h0",)
        ),
        Subgraph(1, "peft", stage_of[1], 1, 1, "lora_1", "lora_1", 1, "sha256:" + "1" * 16, ("h0",), ("lora_1",)),
        Subgraph(
            2,
            "backbone",
            stage_of[2],
            1,
            2,
            "q_1",
            "norm",
            8,
            "sha256:" + "2" * 64,
            ("h0", "lora_1", "layout"),
            ("hidden",),
        ),
    )
    return Partition("peft_hosts", GRAPH_INPUTS, ("hidden",), subgraphs)


PARTITION = make_partition()


def make_task(name: str, r: int = 8, max_seq_len: int = 128, steps: int = 10) -> TaskPlan:
    return TaskPlan(
        name=name,
        peft=LoraSpec(r=r, alpha=16, target_modules=("q_proj", "v_proj")),
        data=DataSpec(path=f"/data/{name}.jsonl", format="prompt_completion"),
        max_seq_len=max_seq_len,
        lr=2e-4,
        schedule=ScheduleSpec(name="cosine", warmup_steps=1),
        steps=steps,
        num_examples=100,
        num_targetless_examples=1,
        num_tokens=5000,
    )


TASKS = (make_task("a", steps=6), make_task("b", r=4, steps=4), make_task("c-2", max_seq_len=64, steps=2))


def make_phases(tasks: Sequence[TaskPlan], split: int = 2, microbatches: int = 2) -> tuple[Phase, ...]:
    """One phase per distinct step count; hTask 0 holds a phase's first ``split`` tasks, hTask 1
    the rest (one hTask when there are no more); every budget is 256 tokens."""
    phases = []
    first = 1
    for last in sorted({t.steps for t in tasks}):
        names = tuple(t.name for t in tasks if t.steps >= last)
        groups = [names[:split], names[split:]] if 0 < split < len(names) else [names]
        htasks = tuple(HTask(i, g, 256 * len(g), (256,) * len(g), microbatches) for i, g in enumerate(groups))
        phases.append(Phase(len(phases), first, last - first + 1, names, htasks))
        first = last + 1
    return tuple(phases)


def passes(h: int, m: int, subgraphs: Sequence[int], loss: bool = True) -> list[Instruction]:
    """Forward of ``subgraphs`` in order, the loss, backward in reverse order (no free)."""
    out: list[Instruction] = [Forward(h, m, s, 0) for s in subgraphs]
    out += [LossBackward(h, m, 0)] if loss else []
    out += [Backward(h, m, s, 0) for s in reversed(subgraphs)]
    return out


def one_rank_body(phase: Phase, checkpoint: tuple[int, ...] = ()) -> tuple[Instruction, ...]:
    """Load every hTask, run each micro-batch through all three subgraphs, step, checkpoint."""
    body: list[Instruction] = [LoadBatches(h.id, 0) for h in phase.htasks]
    body += [RecordEvent("loaded", 1), WaitEvent("loaded", 0)]
    for h in phase.htasks:
        for m in range(h.num_microbatches):
            body += [*passes(h.id, m, (0, 1, 2)), Free(h.id, m, 0)]
    body.append(OptimizerStep(phase.tasks))
    if checkpoint:
        body.append(Checkpoint(checkpoint))
    return tuple(body)


def _predictions(phases: Sequence[Phase]) -> Predictions:
    return Predictions(
        num_rounds=phases[-1].last_round,
        tokens_per_round=4096,
        est_seconds_per_round=0.25,
        est_peak_memory_bytes=1 << 30,
    )


def _placement(num_ranks: int, pipeline: int, data: int, stages: tuple[Stage, ...]) -> Placement:
    return Placement("h100", num_ranks, num_ranks, pipeline, 1, data, stages)


def _finish(fields: dict[str, object], changes: dict[str, object]) -> Plan:
    """A plan of ``fields`` updated by ``changes``, with its fingerprint."""
    fields.setdefault("job", JobSummary("builtin:tiny-llama", "bf16", "/runs/demo", "/jobs/job.yaml"))
    fields.setdefault("backbone", BACKBONE)
    fields.setdefault("alignment", Alignment(chunk_size=64))
    fields.update(changes)
    fingerprint = compute_fingerprint(
        fields["backbone"],  # type: ignore[arg-type]
        fields["tasks"],  # type: ignore[arg-type]
        fields["phases"],  # type: ignore[arg-type]
        fields["partition"],  # type: ignore[arg-type]
    )
    return Plan(fingerprint=fingerprint, **fields)  # type: ignore[arg-type]


def build_plan(**changes: object) -> Plan:
    """One rank, tasks a (6 steps), b (4) and c-2 (2): phases of rounds 1..2, 3..4 and 5..6; the
    first phase has hTasks (a, b) and (c-2,); a checkpoint in rounds 3 and 4."""
    tasks = changes.get("tasks", TASKS)
    phases = changes.get("phases", make_phases(tasks))  # type: ignore[arg-type]
    names = tuple(t.name for t in tasks)  # type: ignore[attr-defined]
    bodies = tuple(one_rank_body(p, (3, 4) if p.first_round <= 3 <= p.last_round else ()) for p in phases)  # type: ignore[attr-defined]
    program = RankProgram(0, "cuda:0", 0, (LoadBackbone(0), BuildTasks(names)), bodies, (ExportAdapters(),))
    fields: dict[str, object] = dict(
        placement=_placement(1, 1, 1, (Stage(0, (0,), 0, 1),)),
        partition=PARTITION,
        tasks=tasks,
        phases=phases,
        programs=(program,),
        predictions=_predictions(phases),  # type: ignore[arg-type]
    )
    return _finish(fields, changes)


PIPELINE_TASKS = (make_task("a", steps=4), make_task("b", r=4, steps=2))


def pipeline_bodies(phase: Phase) -> tuple[tuple[Instruction, ...], tuple[Instruction, ...]]:
    """GPipe order: rank 0 (subgraph 0) forwards every micro-batch and sends it; rank 1
    (subgraphs 1, 2) receives, runs forward, loss and backward and sends the gradient back."""
    first: list[Instruction] = [LoadBatches(h.id, 0) for h in phase.htasks]
    last: list[Instruction] = [LoadBatches(h.id, 0) for h in phase.htasks]
    for h in phase.htasks:
        for m in range(h.num_microbatches):
            first += [Forward(h.id, m, 0, 0), Send(h.id, m, 0, False, 1)]
            last += [Recv(h.id, m, 0, False, 0), *passes(h.id, m, (1, 2)), Send(h.id, m, 0, True, 0), Free(h.id, m, 0)]
        for m in range(h.num_microbatches):
            first += [Recv(h.id, m, 0, True, 1), Backward(h.id, m, 0, 0), Free(h.id, m, 0)]
    first.append(OptimizerStep(phase.tasks))
    last.append(OptimizerStep(phase.tasks))
    return tuple(first), tuple(last)


def build_pipeline_plan(**changes: object) -> Plan:
    """Two ranks, one per stage (layer 0 with the embeddings; layer 1 with the head), tasks a
    (4 steps) and b (2) in one hTask per phase, two micro-batches, sends and recvs."""
    tasks = changes.get("tasks", PIPELINE_TASKS)
    phases = changes.get("phases", make_phases(tasks))  # type: ignore[arg-type]
    names = tuple(t.name for t in tasks)  # type: ignore[attr-defined]
    bodies = [pipeline_bodies(p) for p in phases]  # type: ignore[attr-defined]
    programs = tuple(
        RankProgram(
            rank,
            f"cuda:{rank}",
            rank,
            (LoadBackbone(rank), BuildTasks(names)),
            tuple(b[rank] for b in bodies),
            (ExportAdapters(),),
        )
        for rank in (0, 1)
    )
    fields: dict[str, object] = dict(
        placement=_placement(2, 2, 1, (Stage(0, (0,), 0, 0), Stage(1, (1,), 1, 1))),
        partition=make_partition((0, 1, 1)),
        tasks=tasks,
        phases=phases,
        programs=programs,
        predictions=_predictions(phases),  # type: ignore[arg-type]
    )
    return _finish(fields, changes)


def build_data_parallel_plan(**changes: object) -> Plan:
    """Two replicas of one stage; each runs the one-rank body with an all-reduce of every
    task's gradients before the optimizer step."""
    tasks = changes.get("tasks", PIPELINE_TASKS)
    phases = changes.get("phases", make_phases(tasks))  # type: ignore[arg-type]
    names = tuple(t.name for t in tasks)  # type: ignore[attr-defined]
    bodies = []
    for phase in phases:  # type: ignore[attr-defined]
        body = list(one_rank_body(phase))
        body.insert(len(body) - 1, AllReduce(phase.tasks, (0, 1)))
        bodies.append(tuple(body))
    programs = tuple(
        RankProgram(rank, f"cuda:{rank}", 0, (LoadBackbone(0), BuildTasks(names)), tuple(bodies), (ExportAdapters(),))
        for rank in (0, 1)
    )
    fields: dict[str, object] = dict(
        placement=_placement(2, 1, 2, (Stage(0, (0, 1), 0, 1),)),
        partition=PARTITION,
        tasks=tasks,
        phases=phases,
        programs=programs,
        predictions=_predictions(phases),  # type: ignore[arg-type]
    )
    return _finish(fields, changes)


Edit = Callable[[dict[str, Any]], None]
"""Changes plain plan data in place."""


def edited(plan: Plan, edit: Edit) -> dict[str, Any]:
    """``plan`` as plain data, changed by ``edit``."""
    data = plan_to_dict(plan)
    edit(data)
    return data


def errors_of(data: Any) -> list[str]:
    """The errors `plan_from_dict` refuses ``data`` with (it must refuse it)."""
    with pytest.raises(PlanError) as info:
        plan_from_dict(data)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors
