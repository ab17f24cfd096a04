"""The interpreter runs whatever order the plan gives: all micro-batches of an hTask in flight
at once (every forward, then every backward) ends with the same adapters, bitwise, as one
micro-batch after the other, since each micro-batch carries its own layout and buffers."""

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
from muxtune.runtime.executor import PlanExecutor
from muxtune.runtime.progress import ProgressDisplay
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
