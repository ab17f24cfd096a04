"""The compiler: phases, hTasks, per-task budgets, exact micro-batch counts, checkpoint rounds,
partition, program, determinism, notes."""

from __future__ import annotations

from pathlib import Path

import pytest
from user_path import default_tasks, write_job

from muxtune.compiler.compile import compile_job
from muxtune.compiler.errors import CompileError
from muxtune.plans import Checkpoint, Forward, LoadBatches, dump_plan
from muxtune.runtime.data import batch_indices, load_dataset
from muxtune.runtime.model_sources import resolve_model_dir
from muxtune.runtime.packing import split_task_batch
from muxtune.runtime.tokenizer import load_tokenizer
from muxtune.specs import load_job_spec


def test_one_phase_per_active_set(tmp_path: Path) -> None:
    spec = load_job_spec(write_job(tmp_path))
    plan = compile_job(spec).plan
    steps = {t.name: t.steps for t in spec.tasks}
    assert steps == {"sentiment": 6, "qa": 5, "instructions": 7}
    assert [(p.first_round, p.num_rounds, p.tasks) for p in plan.phases] == [
        (1, 5, ("sentiment", "qa", "instructions")),
        (6, 1, ("sentiment", "instructions")),
        (7, 1, ("instructions",)),
    ]
    assert [[h.tasks for h in p.htasks] for p in plan.phases] == [[p.tasks] for p in plan.phases]
    assert plan.predictions.num_rounds == 7 == plan.num_rounds
    assert len(plan.programs[0].phases) == 3


def test_microbatch_counts_are_exact(tmp_path: Path) -> None:
    spec = load_job_spec(write_job(tmp_path))
    plan = compile_job(spec, task_tokens=128).plan
    tokenizer = load_tokenizer(resolve_model_dir(spec.model))
    for phase in plan.phases:
        for htask in phase.htasks:
            needed = 0
            for name in htask.tasks:
                task = plan.task(name)
                usable = load_dataset(task.data.path, task.data.format, tokenizer, task.max_seq_len).usable
                stream = batch_indices(len(usable), task.batch_size, task.seed)
                for round_index in range(1, phase.last_round + 1):
                    batch = [usable[i] for i in next(stream)]
                    if round_index >= phase.first_round:
                        needed = max(needed, len(split_task_batch(batch, htask.budget_of(name))))
            assert htask.num_microbatches == needed
    body = plan.programs[0].phases[0]
    forwards = [i for i in body if isinstance(i, Forward) and i.htask == 0]
    htask = plan.phases[0].htasks[0]
    assert len(forwards) == htask.num_microbatches * len(plan.partition.subgraphs) > 1


def test_checkpoint_rounds_are_planned(tmp_path: Path) -> None:
    plan = compile_job(load_job_spec(write_job(tmp_path))).plan
    rounds = [[i.rounds for i in body if isinstance(i, Checkpoint)] for body in plan.programs[0].phases]
    # sentiment saves every 2 of 6 steps, qa every step of 5, instructions every 3 of 7 (and at the end)
    assert rounds == [[(1, 2, 3, 4, 5)], [(6,)], [(7,)]]


def test_fused_and_unfused_plans(tmp_path: Path) -> None:
    spec = load_job_spec(write_job(tmp_path))
    fused = compile_job(spec).plan
    unfused = compile_job(spec, fusion="no_fuse").plan
    assert [h.tasks for h in unfused.phases[0].htasks] == [("sentiment",), ("qa",), ("instructions",)]
    loads = [i.htask for i in unfused.programs[0].phases[0] if isinstance(i, LoadBatches)]
    assert sorted(loads) == [0, 1, 2]
    assert fused.fingerprint != unfused.fingerprint


def test_partition_policies(tmp_path: Path) -> None:
    spec = load_job_spec(write_job(tmp_path))
    coarse = compile_job(spec).plan.partition
    fine = compile_job(spec, policy="fine").plan.partition
    assert [s.kind for s in coarse.subgraphs] == ["backbone"] * 3
    assert len(fine.subgraphs) > len(coarse.subgraphs) and "peft" in {s.kind for s in fine.subgraphs}
    with pytest.raises(CompileError, match="partition: unknown partition policy 'coarse'"):
        compile_job(spec, policy="coarse")


def test_budgets_depend_on_the_task_alone(tmp_path: Path) -> None:
    spec = load_job_spec(write_job(tmp_path))
    alone = compile_job(load_job_spec(write_job(tmp_path / "one", [default_tasks()[1]]))).plan
    together = compile_job(spec).plan.phases[0].htasks[0]
    assert alone.phases[0].htasks[0].budget_of("qa") == together.budget_of("qa")
    assert together.micro_batch_tokens == sum(together.token_budgets)
    small = compile_job(spec, task_tokens=64).plan
    assert all(b >= 64 for b in small.phases[0].htasks[0].token_budgets), "never below the longest sequence"


def test_compile_is_deterministic(tmp_path: Path) -> None:
    spec = load_job_spec(write_job(tmp_path))
    assert dump_plan(compile_job(spec).plan) == dump_plan(compile_job(spec).plan)


def test_targetless_examples_are_reported(tmp_path: Path) -> None:
    spec = load_job_spec(write_job(tmp_path), ["tasks.qa.max_seq_len=300"])
    result = compile_job(spec)
    qa = result.plan.task("qa")
    assert qa.num_targetless_examples > 0
    assert any(note.startswith("tasks.qa:") and "keep no target token" in note for note in result.notes)


def test_driver_names_the_failing_pass() -> None:
    from muxtune.compiler.driver import CompilerPassError, PassDriver

    passes = PassDriver()
    assert passes.run("trace", lambda: 1) == 1
    with pytest.raises(CompilerPassError, match="compiler pass 'partition' failed after pass 'trace': KeyError"):
        passes.run("partition", {}.__getitem__, "x")
    with pytest.raises(CompileError):
        passes.run("align", lambda: (_ for _ in ()).throw(CompileError(["tasks: bad"])))
