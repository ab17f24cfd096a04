"""The interpreter runs whatever order the plan gives: all micro-batches of an hTask in flight
at once (every forward, then every backward) ends with the same adapters, bitwise, as one
micro-batch after the other, since each micro-batch carries its own layout and buffers. A plan
run equals the engine's monolithic rounds bitwise (so the fidelity tests against transformers +
peft, written on the engine, hold for plans), and a task fused in a plan equals it alone."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from user_path import default_tasks, write_job

from muxtune.compiler.compile import compile_job
from muxtune.plans import MICROBATCH_OPS, Backward, Free, Instruction, Plan, load_plan, save_plan
from muxtune.runtime.adapters import WEIGHTS_NAME
from muxtune.runtime.backbone import load_model
from muxtune.runtime.data import batch_indices, load_dataset
from muxtune.runtime.engine import MultiTaskEngine
from muxtune.runtime.executor import PlanExecutor
from muxtune.runtime.peft.registry import PEFT_PREFIX
from muxtune.runtime.progress import ProgressDisplay
from muxtune.runtime.task_runs import task_training
from muxtune.specs import load_job_spec


def all_in_flight(body: tuple[Instruction, ...]) -> tuple[Instruction, ...]:
    """``body`` with each hTask's micro-batches interleaved: every forward and loss first, then
    every backward and free (micro-batch order kept within each group)."""
    out: list[Instruction] = []
    ahead: list[Instruction] = []
    behind: list[Instruction] = []
    for instruction in body:
        if isinstance(instruction, (Backward, Free)):
            behind.append(instruction)
        elif isinstance(instruction, MICROBATCH_OPS):
            ahead.append(instruction)
        else:
            out += ahead + behind + [instruction]
            ahead, behind = [], []
    return tuple(out + ahead + behind)


def run_plan(plan: Plan, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    plan = dataclasses.replace(plan, job=dataclasses.replace(plan.job, output_dir=str(out)))
    PlanExecutor(plan, progress=ProgressDisplay([(t.name, t.steps) for t in plan.tasks], io.StringIO())).run()
    return {t.name: load_file(str(out / t.name / WEIGHTS_NAME)) for t in plan.tasks}


@pytest.mark.parametrize("policy", ["per_layers(1)", "fine"])
def test_all_microbatches_in_flight_equal_one_after_another(policy: str, tmp_path: Path) -> None:
    tasks = [{**task, "steps": 2, "save_every": 0} for task in default_tasks()]
    spec = load_job_spec(write_job(tmp_path, tasks))
    plan = compile_job(spec, task_tokens=64, policy=policy).plan
    assert max(h.num_microbatches for p in plan.phases for h in p.htasks) >= 2
    program = plan.programs[0]
    interleaved = dataclasses.replace(program, phases=tuple(all_in_flight(body) for body in program.phases))
    assert interleaved.phases != program.phases
    in_flight = load_plan(save_plan(dataclasses.replace(plan, programs=(interleaved,)), tmp_path / "in_flight.yaml"))
    sequential = run_plan(plan, tmp_path / "sequential")
    together = run_plan(in_flight, tmp_path / "in_flight")
    for name, tensors in sequential.items():
        for key, value in tensors.items():
            assert torch.equal(together[name][key], value), f"{name}:{key}"


def engine_run(plan: Plan) -> dict[str, dict[str, torch.Tensor]]:
    """The same job through `MultiTaskEngine.train_round` (the path the fidelity tests against
    transformers + peft exercise), on the plan's batches and budgets."""
    loaded = load_model(plan.job.model, plan.job.dtype)
    engine = MultiTaskEngine(loaded.model)
    streams, examples = {}, {}
    for task in plan.tasks:
        engine.add_task(task_training(task))
        examples[task.name] = load_dataset(task.data.path, task.data.format, loaded.tokenizer, task.max_seq_len).usable
        streams[task.name] = batch_indices(len(examples[task.name]), task.batch_size, task.seed)
    for phase in plan.phases:
        for _ in range(phase.num_rounds):
            batches = {name: [examples[name][i] for i in next(streams[name])] for name in phase.tasks}
            budgets = {name: phase.htask_of(name).budget_of(name) for name in phase.tasks}
            engine.train_round(batches, budgets)
    return {name: state.adapter_state() for name, state in engine.tasks.items()}


def test_plan_run_equals_engine_and_fused_equals_alone(tmp_path: Path) -> None:
    tasks = [{**task, "steps": 3, "save_every": 0} for task in default_tasks()]
    plan = compile_job(load_job_spec(write_job(tmp_path, tasks)), task_tokens=96).plan
    fused = run_plan(plan, tmp_path / "fused")
    reference = engine_run(plan)
    for name, tensors in reference.items():
        for key, value in tensors.items():
            assert torch.equal(fused[name][PEFT_PREFIX + key], value), f"{name}:{key}"
    alone_plan = compile_job(load_job_spec(write_job(tmp_path / "alone", tasks[1:2])), task_tokens=96).plan
    alone = run_plan(alone_plan, tmp_path / "alone" / "out")["qa"]
    for key, value in alone.items():
        torch.testing.assert_close(fused["qa"][key], value, rtol=1e-5, atol=1e-7)
