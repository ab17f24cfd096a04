"""Builders for a small valid two-rank, three-task plan that plan tests start from."""

from __future__ import annotations

from muxtune.plans import (
    Alignment,
    BuildTasks,
    Checkpoint,
    ClusterPlan,
    ExportAdapters,
    ForwardBackward,
    HTask,
    JobSummary,
    LoadBackbone,
    OptimizerStep,
    Plan,
    Predictions,
    RankProgram,
    TaskPlan,
    compute_fingerprint,
)
from muxtune.specs import DataSpec, PeftSpec, ScheduleSpec

BACKBONE = {
    "name": "tiny-llama",
    "hidden_size": 64,
    "num_layers": 2,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "extra": {"layer_types": ["full", "full"], "note": None},
}


def make_task(name: str, r: int = 8, max_seq_len: int = 128, steps: int = 10) -> TaskPlan:
    return TaskPlan(
        name=name,
        peft=PeftSpec(r=r, alpha=16, target_modules=("q_proj", "v_proj")),
        data=DataSpec(path=f"/data/{name}.jsonl", format="prompt_completion"),
        max_seq_len=max_seq_len,
        lr=2e-4,
        schedule=ScheduleSpec(name="cosine", warmup_steps=2),
        steps=steps,
        num_examples=100,
        num_targetless_examples=1,
        num_tokens=5000,
    )


def build_plan(**changes: object) -> Plan:
    tasks = (make_task("a"), make_task("b", r=4, steps=5), make_task("c-2", max_seq_len=64))
    htasks = (HTask(0, ("a", "b"), 512, (256, 256)), HTask(1, ("c-2",), 256, (256,)))
    names = tuple(t.name for t in tasks)
    round_ = (
        ForwardBackward(0),
        ForwardBackward(1),
        OptimizerStep(names),
        Checkpoint(),
    )
    programs = tuple(
        RankProgram(
            rank=rank,
            device=f"cuda:{rank}",
            prologue=(LoadBackbone(), BuildTasks(names)),
            round=round_,
            epilogue=(ExportAdapters(),),
        )
        for rank in range(2)
    )
    fields: dict[str, object] = dict(
        job=JobSummary(model="builtin:tiny-llama", dtype="bf16", output_dir="/runs/demo", spec_path="/jobs/job.yaml"),
        backbone=BACKBONE,
        cluster=ClusterPlan(device="h100", num_devices=2, num_ranks=2),
        tasks=tasks,
        htasks=htasks,
        alignment=Alignment(chunk_size=64),
        programs=programs,
        predictions=Predictions(
            num_rounds=10,
            tokens_per_round=4096,
            est_seconds_per_round=0.25,
            est_peak_memory_bytes=1 << 30,
        ),
    )
    fields.update(changes)
    fingerprint = compute_fingerprint(
        fields["backbone"],
        fields["tasks"],
        fields["htasks"],  # type: ignore[arg-type]
    )
    return Plan(fingerprint=fingerprint, **fields)  # type: ignore[arg-type]
