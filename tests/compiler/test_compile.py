"""The first compiler: hTasks, per-task budgets, program, determinism, notes."""

from __future__ import annotations

from pathlib import Path

from user_path import default_tasks, write_job

from muxtune.compiler.compile import compile_job
from muxtune.plans import ForwardBackward, dump_plan
from muxtune.specs import load_job_spec


def test_fused_and_unfused_plans(tmp_path: Path) -> None:
    spec = load_job_spec(write_job(tmp_path))
    fused = compile_job(spec).plan
    assert [h.tasks for h in fused.htasks] == [("sentiment", "qa", "instructions")]
    unfused = compile_job(spec, fuse=False).plan
    assert [h.tasks for h in unfused.htasks] == [("sentiment",), ("qa",), ("instructions",)]
    assert [i.htask for i in unfused.programs[0].round if isinstance(i, ForwardBackward)] == [0, 1, 2]
    assert fused.fingerprint != unfused.fingerprint
    assert fused.predictions.num_rounds == max(t.steps for t in spec.tasks)


def test_budgets_depend_on_the_task_alone(tmp_path: Path) -> None:
    spec = load_job_spec(write_job(tmp_path))
    alone = compile_job(load_job_spec(write_job(tmp_path / "one", [default_tasks()[1]]))).plan
    together = compile_job(spec).plan
    budget = dict(zip(together.htasks[0].tasks, together.htasks[0].token_budgets))
    assert dict(zip(alone.htasks[0].tasks, alone.htasks[0].token_budgets))["qa"] == budget["qa"]
    assert budget["qa"] >= 1 and together.htasks[0].micro_batch_tokens == sum(budget.values())
    small = compile_job(spec, task_tokens=64).plan
    assert all(b >= 64 for b in small.htasks[0].token_budgets), "never below the longest sequence"


def test_compile_is_deterministic(tmp_path: Path) -> None:
    spec = load_job_spec(write_job(tmp_path))
    assert dump_plan(compile_job(spec).plan) == dump_plan(compile_job(spec).plan)


def test_targetless_examples_are_reported(tmp_path: Path) -> None:
    spec = load_job_spec(write_job(tmp_path), ["tasks.qa.max_seq_len=300"])
    result = compile_job(spec)
    qa = result.plan.task("qa")
    assert qa.num_targetless_examples > 0
    assert any(note.startswith("tasks.qa:") and "keep no target token" in note for note in result.notes)
