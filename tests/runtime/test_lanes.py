"""Streams as lanes on the CPU: each stream's instructions run in body order on their own thread,
ordered across streams only by events; a failing lane stops the others and its error reaches
the caller; one intra-op thread (or one stream) runs the body in order. End to end, a plan
whose hTasks run side by side trains the same adapters as the plan that runs them one after
another, the trace shows the two streams' work overlapping and the profiler records both lanes."""

from __future__ import annotations

import dataclasses
import io
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from user_path import default_tasks, write_job

from muxtune.compiler.compile import compile_job
from muxtune.compiler.cost.devices import DEVICE_TABLES
from muxtune.compiler.passes.emit import single_rank_program, stream_done_event
from muxtune.plans import (
    Checkpoint,
    Forward,
    Instruction,
    LoadBatches,
    OptimizerStep,
    Plan,
    RecordEvent,
    WaitEvent,
    validate_plan,
)
from muxtune.plans.stream_checks import htask_streams
from muxtune.runtime.adapters import WEIGHTS_NAME
from muxtune.runtime.execution.lanes import LaneRunner, split_lanes
from muxtune.runtime.executor import PlanExecutor
from muxtune.runtime.progress import ProgressDisplay
from muxtune.runtime.trace import TRACE_DIR, compute_row
from muxtune.specs import load_job_spec


def two_lane_body() -> list[Instruction]:
    return [
        LoadBatches(0, 0),
        Forward(0, 0, 0, 0),
        RecordEvent("zero-loaded", 0),
        LoadBatches(1, 1),
        WaitEvent("zero-loaded", 1),
        Forward(1, 0, 0, 1),
        RecordEvent("stream-1-done", 1),
        WaitEvent("stream-1-done", 0),
        OptimizerStep(("a", "b")),
    ]


def test_split_lanes_by_stream() -> None:
    lanes = split_lanes(two_lane_body())
    assert sorted(lanes) == [0, 1]
    assert [type(i).__name__ for i in lanes[1]] == ["LoadBatches", "WaitEvent", "Forward", "RecordEvent"]
    assert isinstance(lanes[0][-1], OptimizerStep)


def test_lanes_run_apart_and_keep_event_order() -> None:
    done: list[tuple[str, Instruction, int]] = []
    lock = threading.Lock()

    def execute(instruction: Instruction) -> None:
        if isinstance(instruction, Forward) and instruction.htask == 0:
            time.sleep(0.05)  # stream 1's forward must still wait for it
        with lock:
            done.append((threading.current_thread().name, instruction, torch.get_num_threads()))

    before = torch.get_num_threads()
    runner = LaneRunner(threads=2)
    try:
        assert runner.run(two_lane_body(), execute) == 2
        assert torch.get_num_threads() == 2, "the calling thread gets the rank's intra-op threads back"
    finally:
        runner.close()
        torch.set_num_threads(before)
    order = [i for _, i, _ in done]
    assert order.index(Forward(0, 0, 0, 0)) < order.index(Forward(1, 0, 0, 1)) < order.index(OptimizerStep(("a", "b")))
    threads = {i: name for name, i, _ in done}
    assert threads[Forward(0, 0, 0, 0)] == threading.current_thread().name != threads[Forward(1, 0, 0, 1)]
    joined = order.index(WaitEvent("stream-1-done", 0))
    assert {n for _, _, n in done[:joined]} == {1}, "each of two lanes gets one of the two intra-op threads"
    after = [(i, n) for _, i, n in done if order.index(i) >= joined]
    assert after == [(WaitEvent("stream-1-done", 0), 2), (OptimizerStep(("a", "b")), 2)], (
        "past its wait for stream 1's closing event, stream 0 runs alone with both threads"
    )


def test_one_thread_runs_the_body_in_order() -> None:
    done: list[Instruction] = []
    runner = LaneRunner(threads=1)
    assert runner.run(two_lane_body(), done.append) == 1
    assert done == two_lane_body()


def test_a_failing_lane_stops_the_others_and_raises() -> None:
    body = two_lane_body()
    body.insert(1, WaitEvent("never-recorded-in-time", 0))
    body.insert(4, RecordEvent("never-recorded-in-time", 1))

    def execute(instruction: Instruction) -> None:
        if isinstance(instruction, LoadBatches) and instruction.htask == 1:
            raise ValueError("batch file vanished")

    runner = LaneRunner(threads=2)
    started = time.perf_counter()
    try:
        with pytest.raises(ValueError, match="batch file vanished"):
            runner.run(body, execute)
    finally:
        runner.close()
    assert time.perf_counter() - started < 5


def one_round_bodies(plan: Plan, tails: int = 0) -> Plan:
    """``plan`` with one round per body, each hTask on the stream of its first round in the
    plan's body, and stream 0's last ``tails`` micro-batches joined."""
    phases = tuple(dataclasses.replace(p, rounds_per_body=1) for p in plan.phases)
    streams = [
        {h: s for h, s in htask_streams(body).items() if h < len(phase.htasks)}
        for phase, body in zip(phases, plan.programs[0].phases)
    ]
    program = single_rank_program(plan.tasks, phases, plan.partition, "cpu", streams, [tails] * len(phases))
    return validate_plan(dataclasses.replace(plan, phases=phases, programs=(program,)))


def run_plan(plan: Plan, out: Path, watched: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Run ``plan`` into ``out`` (``watched``: with the executor's trace and the profiler)."""
    plan = dataclasses.replace(plan, job=dataclasses.replace(plan.job, output_dir=str(out)))
    progress = ProgressDisplay([(t.name, t.steps) for t in plan.tasks], io.StringIO())
    summary = PlanExecutor(plan, progress=progress, trace=watched, profile=watched).run()
    program = plan.programs[0]
    planned = len(program.prologue) + len(program.epilogue)
    planned += sum(
        phase.num_rounds // phase.rounds_per_body * len(body) for phase, body in zip(plan.phases, program.phases)
    )
    assert summary["instructions_executed"] == planned, "every instruction, events included, runs once"
    for timing, body in zip(summary["phases"], program.phases):
        streams = {getattr(i, "stream", 0) for i in body}
        assert timing["lanes"] == len(streams), "each stream of a body ran as its own lane"
    return {t.name: load_file(str(out / t.name / WEIGHTS_NAME)) for t in plan.tasks}


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="lanes need two intra-op threads")
def test_side_by_side_trains_the_same_adapters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = [{**task, "steps": 2, "save_every": 0} for task in default_tasks()]
    spec = load_job_spec(write_job(tmp_path, tasks))
    cpu = dataclasses.replace(DEVICE_TABLES["cpu"], stream_slowdown=1.2)  # lanes pay for this small job
    monkeypatch.setitem(DEVICE_TABLES, "cpu", cpu)
    side_by_side = one_round_bodies(compile_job(spec, fusion="no_fuse").plan)  # the profile skips the first body
    one_after_another = compile_job(spec, fusion="no_fuse", streams=1).plan
    assert any(getattr(i, "stream", 0) == 1 for i in side_by_side.programs[0].phases[0])
    apart = run_plan(side_by_side, tmp_path / "apart", watched=True)
    together = run_plan(one_after_another, tmp_path / "together")
    for name, tensors in together.items():
        for key, value in tensors.items():
            torch.testing.assert_close(apart[name][key], value, rtol=1e-5, atol=1e-7, msg=f"{name}:{key}")
    events = json.loads((tmp_path / "apart" / TRACE_DIR / "rank-0.json").read_text())["traceEvents"]
    spans = {
        row: [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("tid") == row and e["ph"] == "X"]
        for row in (compute_row(0), compute_row(1))
    }
    assert spans[compute_row(1)], "stream 1's instructions have their own trace row"
    assert any(a < d and c < b for a, b in spans[compute_row(0)] for c, d in spans[compute_row(1)]), "lanes overlap"
    profiled = json.loads((tmp_path / "apart" / "profile" / "rank-0.json").read_text())["traceEvents"]
    threads = {e["tid"] for e in profiled if e.get("cat") == "cpu_op" and e["name"] == "aten::mm"}
    assert len(threads) == 2, "the profiler records the operators of both lanes"


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="lanes need two intra-op threads")
def test_a_joined_tail_runs_alone_and_trains_the_same_adapters_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stream 0's last micro-batch after its join runs with both threads: on every run the same
    instructions, so two runs train bitwise the same adapters (and the same as one stream's, up
    to the threads' rounding)."""
    tasks = [{**task, "steps": 2, "save_every": 0} for task in default_tasks()]
    spec = load_job_spec(write_job(tmp_path, tasks))
    monkeypatch.setitem(DEVICE_TABLES, "cpu", dataclasses.replace(DEVICE_TABLES["cpu"], stream_slowdown=1.2))
    plan = one_round_bodies(compile_job(spec, fusion="no_fuse").plan)
    streams = [htask_streams(body) for body in plan.programs[0].phases]
    assert any(any(s.values()) for s in streams)
    program = single_rank_program(plan.tasks, plan.phases, plan.partition, "cpu", streams, [1] * len(streams))
    tailed = validate_plan(dataclasses.replace(plan, programs=(program,)))
    body = tailed.programs[0].phases[0]
    join = body.index(WaitEvent(stream_done_event(1), 0))
    assert any(isinstance(i, Forward) and i.stream == 0 for i in body[join:]), "a micro-batch runs after the join"
    first = run_plan(tailed, tmp_path / "first")
    second = run_plan(tailed, tmp_path / "second")
    serial = run_plan(compile_job(spec, fusion="no_fuse", streams=1).plan, tmp_path / "serial")
    for name, tensors in serial.items():
        for key, value in tensors.items():
            assert torch.equal(first[name][key], second[name][key]), f"{name}:{key} differs between runs"
            torch.testing.assert_close(first[name][key], value, rtol=1e-5, atol=1e-7, msg=f"{name}:{key}")


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="lanes need two intra-op threads")
def test_a_body_of_two_rounds_trains_the_same_adapters_as_lanes_that_meet_every_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each hTask's next round starts on whichever lane the plan gives it, right after its own
    optimizer step, and its steps run on that lane: every hTask still runs on one thread, so
    the adapters are bitwise those of the same streams meeting after every round."""
    tasks = [{**task, "steps": 4, "save_every": 2} for task in default_tasks()]
    spec = load_job_spec(write_job(tmp_path, tasks))
    monkeypatch.setitem(DEVICE_TABLES, "cpu", dataclasses.replace(DEVICE_TABLES["cpu"], stream_slowdown=1.2))
    plan = compile_job(spec, fusion="no_fuse").plan
    assert len(plan.phases[0].htasks) > 1
    phases = tuple(dataclasses.replace(p, rounds_per_body=2) for p in plan.phases)
    size = len(phases[0].htasks)
    every_htask_changes_lanes = {h + j * size: (h + j) % 2 for j in range(2) for h in range(size)}
    schedules = [every_htask_changes_lanes] + [{} for _ in phases[1:]]
    program = single_rank_program(plan.tasks, phases, plan.partition, "cpu", schedules)
    two_rounds = validate_plan(dataclasses.replace(plan, phases=phases, programs=(program,)))
    body = two_rounds.programs[0].phases[0]
    assert any(isinstance(i, OptimizerStep) and i.stream == 1 for i in body), "lane 1 steps its own tasks"
    assert Checkpoint((2, 4)) in body, "the checkpoints of save_every=2 end the bodies"
    assert any(isinstance(i, WaitEvent) and i.event.startswith("htask-") for i in body), "an hTask changes lanes"
    apart = run_plan(two_rounds, tmp_path / "two-rounds", watched=True)
    meeting = run_plan(one_round_bodies(two_rounds), tmp_path / "every-round")
    for name, tensors in meeting.items():
        for key, value in tensors.items():
            assert torch.equal(apart[name][key], value), f"{name}:{key}"
    summary = json.loads((tmp_path / "two-rounds" / "summary.json").read_text())
    assert [t["steps"] for t in summary["tasks"].values()] == [4] * len(tasks)
    events = json.loads((tmp_path / "two-rounds" / TRACE_DIR / "rank-0.json").read_text())["traceEvents"]
    rounds = {
        e["args"]["round"] for e in events if e.get("ph") == "X" and e.get("args", {}).get("op") == "load_batches"
    }
    assert rounds == {1, 2, 3, 4}, "the trace names each instance's own round"
    resumed = resume_after_first_checkpoint(two_rounds, tmp_path / "resumed", monkeypatch)
    for name, tensors in meeting.items():
        for key, value in tensors.items():
            assert torch.equal(resumed[name][key], value), f"{name}:{key} after resuming"


def resume_after_first_checkpoint(
    plan: Plan, out: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, dict[str, torch.Tensor]]:
    """Run ``plan`` into ``out``, stop it right after its first checkpoint, resume it; the
    adapters it ends with."""
    plan = dataclasses.replace(plan, job=dataclasses.replace(plan.job, output_dir=str(out)))
    checkpoint = PlanExecutor._checkpoint

    def stop_after(executor: PlanExecutor, instruction: Checkpoint) -> None:
        checkpoint(executor, instruction)
        if executor.round_index in instruction.rounds:
            raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(PlanExecutor, "_checkpoint", stop_after)
        with pytest.raises(KeyboardInterrupt):
            PlanExecutor(plan, progress=ProgressDisplay([(t.name, t.steps) for t in plan.tasks], io.StringIO())).run()
    progress = ProgressDisplay([(t.name, t.steps) for t in plan.tasks], io.StringIO())
    summary = PlanExecutor(plan, resume=True, progress=progress).run()
    assert [p["rounds_run"] for p in summary["phases"]][0] == 2, "the second body only"
    return {t.name: load_file(str(out / t.name / WEIGHTS_NAME)) for t in plan.tasks}
