"""hTasks side by side: the emit pass puts each hTask on the stream it is given and joins the
streams before the optimizer step (or before stream 0's last micro-batches, its joined tail);
the streams pass deals hTasks largest first (checked against brute force on small instances) and
takes the joined tail of the shortest simulated round; the compiler keeps streams only where the
simulation predicts a shorter round, and ``streams=1`` keeps every hTask on stream 0."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch.fx
from test_emit import CONFIG, NUM_LAYERS, TASKS, build_plan, make_phases
from user_path import default_tasks, write_job

import muxtune.compiler.compile as compile_module
import muxtune.compiler.side_by_side as side_by_side_module
from muxtune.compiler.compile import compile_job
from muxtune.compiler.cost.devices import DEVICE_TABLES, device_spec
from muxtune.compiler.errors import CompileError
from muxtune.compiler.passes import partition, trace_model
from muxtune.compiler.passes.emit import (
    ROUND_START_EVENT,
    rank_role,
    rank_round_body,
    single_rank_program,
    stage_subgraphs,
    stream_done_event,
)
from muxtune.compiler.passes.placement import placement
from muxtune.compiler.passes.simulate import PhaseSimulation
from muxtune.compiler.passes.solve import MEMORY_SLACK
from muxtune.compiler.passes.streams import best_tail, body_rounds_allowed, deal_streams
from muxtune.plans import Forward, LoadBatches, OptimizerStep, Phase, Plan, RecordEvent, WaitEvent, validate_plan
from muxtune.runtime.execution import per_layers, per_stage, stage_of_layer
from muxtune.runtime.execution.plan_partition import plan_partition
from muxtune.specs import load_job_spec


@pytest.fixture(scope="module")
def traced() -> torch.fx.GraphModule:
    return trace_model(CONFIG, {t.name: t.peft for t in TASKS}, head=False)


def test_htasks_on_their_streams_joined_before_the_step(traced: torch.fx.GraphModule) -> None:
    part = plan_partition(partition(traced, per_layers(1024)))
    phases = make_phases(3)
    streams = [{0: 1, 2: 1}, {1: 1}, {}]
    mesh = placement("cpu", NUM_LAYERS, (NUM_LAYERS,), 1, 1)
    plan = build_plan(mesh, part, phases)
    program = single_rank_program(TASKS, phases, part, "cpu", streams)
    plan = validate_plan(dataclasses.replace(plan, programs=(program,)))
    for body, phase, chosen in zip(plan.programs[0].phases, phases, streams):
        for ins in body:
            if getattr(ins, "htask", None) is not None:
                assert ins.stream == chosen.get(ins.htask, 0), ins
        if any(chosen.values()):
            assert list(body[:2]) == [RecordEvent(ROUND_START_EVENT, 0), WaitEvent(ROUND_START_EVENT, 1)]
        step = next(i for i, ins in enumerate(body) if isinstance(ins, OptimizerStep))
        joins = body[step - 2 : step] if any(chosen.values()) else ()
        assert list(joins) == (
            [RecordEvent(stream_done_event(1), 1), WaitEvent(stream_done_event(1), 0)] if any(chosen.values()) else []
        )
        named_first = list(chosen) + [h.id for h in phase.htasks if h.id not in chosen]
        assert [i.htask for i in body if isinstance(i, LoadBatches)] == named_first, "the streams' order"


def test_pipeline_stages_keep_stream_0(traced: torch.fx.GraphModule) -> None:
    mesh = placement("cpu", NUM_LAYERS, (2, 2), 1, 1)
    part = plan_partition(partition(traced, per_stage((0, 2), 1)), stage_of=stage_of_layer((0, 2)))
    role = rank_role(mesh, stage_subgraphs(part, 2), 0)
    with pytest.raises(ValueError, match="stream 0"):
        rank_round_body(make_phases(2)[0], role, TASKS, {1: 1})


def makespan(seconds: dict[int, float], streams: dict[int, int], count: int) -> float:
    return max(sum(seconds[h] for h, s in streams.items() if s == lane) for lane in range(count))


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("seed", range(12))
def test_dealing_is_within_the_lpt_bound_of_the_best(count: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    size = 2 + seed % 5
    seconds = {h: float(t) for h, t in enumerate(torch.rand(size, generator=generator).tolist())}
    dealt = deal_streams(seconds, count)
    assert sorted(dealt) == sorted(seconds) and set(dealt.values()) <= set(range(count))
    assert dealt[max(seconds, key=seconds.__getitem__)] == 0, "the largest hTask stays on stream 0"
    assert list(dealt) == sorted(seconds, key=lambda h: (-seconds[h], h)), "largest first: the tail is the smallest"
    best = min(
        makespan(seconds, dict(enumerate(choice)), count) for choice in itertools.product(range(count), repeat=size)
    )
    assert makespan(seconds, dealt, count) <= best * (4 / 3 - 1 / (3 * count)) + 1e-12


def streams_used(plan: Plan) -> set[int]:
    return {getattr(i, "stream", 0) for body in plan.programs[0].phases for i in body}


def cpu_lanes_slowed(monkeypatch: pytest.MonkeyPatch, slowdown: float) -> None:
    """The CPU row with another per-lane slowdown (the calibrated one depends on the machine)."""
    monkeypatch.setitem(DEVICE_TABLES, "cpu", dataclasses.replace(DEVICE_TABLES["cpu"], stream_slowdown=slowdown))


def test_compiler_runs_htasks_side_by_side_only_where_predicted_faster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks = [{**task, "steps": 2, "save_every": 0} for task in default_tasks()]
    spec = load_job_spec(write_job(tmp_path, tasks))
    assert device_spec("cpu").parallel_streams == 2
    cpu_lanes_slowed(monkeypatch, 1.2)
    unfused = compile_job(spec, fusion="no_fuse").plan
    alone = compile_job(spec, fusion="no_fuse", streams=1).plan
    assert streams_used(alone) == {0}
    assert streams_used(unfused) == {0, 1}, "three one-task hTasks on a 2-core CPU run on two streams"
    for side, one in zip(unfused.predictions.phases, alone.predictions.phases):
        assert side.seconds_per_round <= one.seconds_per_round
    assert unfused.predictions.est_seconds_per_round < alone.predictions.est_seconds_per_round
    cpu_lanes_slowed(monkeypatch, 2.5)
    assert streams_used(compile_job(spec, fusion="no_fuse").plan) == {0}, "no gain predicted: one stream"
    on_gpu = compile_job(load_job_spec(write_job(tmp_path / "gpu", tasks, cluster={"device": "h100"}))).plan
    assert streams_used(on_gpu) == {0}


@pytest.mark.parametrize("slowdown", [1.2, 1.6])
def test_the_planner_is_never_predicted_slower_than_one_htask_per_task_side_by_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slowdown: float
) -> None:
    tasks = [{**task, "steps": 2, "save_every": 0} for task in default_tasks()]
    spec = load_job_spec(write_job(tmp_path, tasks))
    cpu_lanes_slowed(monkeypatch, slowdown)
    result = compile_job(spec)
    separate = compile_job(spec, fusion="no_fuse").plan
    assert result.plan.predictions.est_total_seconds <= separate.predictions.est_total_seconds * (1 + MEMORY_SLACK)
    took_separate = [h.tasks for h in result.plan.phases[0].htasks] == [h.tasks for h in separate.phases[0].htasks]
    noted = any(note.startswith("planner: one hTask per task") for note in result.notes)
    solver_only = all(r.status != "FIXED" for r in result.plan.solver)
    assert noted == (not solver_only) and (not noted or took_separate)


def test_the_solvers_plan_stands_where_one_htask_per_task_does_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks = [{**task, "steps": 2, "save_every": 0} for task in default_tasks()]
    spec = load_job_spec(write_job(tmp_path, tasks))
    cpu_lanes_slowed(monkeypatch, 1.2)
    assert any(n.startswith("planner: one hTask per task") for n in compile_job(spec).notes)
    solve = compile_module.plan_job

    def per_task_does_not_fit(*args: object, mode: str = "solve", **kwargs: object) -> object:
        if mode == "no_fuse":
            raise CompileError(["does not fit"])
        return solve(*args, mode=mode, **kwargs)

    monkeypatch.setattr(compile_module, "plan_job", per_task_does_not_fit)
    result = compile_job(spec)
    assert not any(n.startswith("planner:") for n in result.notes)
    assert all(r.status != "FIXED" for r in result.plan.solver)


@pytest.mark.parametrize("tail", [1, 2, 99])
def test_joined_tail_moves_stream_zeros_last_microbatches_past_the_join(
    traced: torch.fx.GraphModule, tail: int
) -> None:
    part = plan_partition(partition(traced, per_layers(1024)))
    phases = make_phases(3)
    streams = [{1: 1}, {1: 1}, {}]
    mesh = placement("cpu", NUM_LAYERS, (NUM_LAYERS,), 1, 1)
    plan = build_plan(mesh, part, phases)
    plain = single_rank_program(TASKS, phases, part, "cpu", streams).phases[0]
    program = single_rank_program(TASKS, phases, part, "cpu", streams, [tail] * 3)
    body = validate_plan(dataclasses.replace(plan, programs=(program,))).programs[0].phases[0]
    assert sorted(map(repr, body)) == sorted(map(repr, plain)), "the same instructions, in another order"
    join = body.index(WaitEvent(stream_done_event(1), 0))
    own = [(h.id, m) for h in phases[0].htasks if streams[0].get(h.id, 0) == 0 for m in range(h.num_microbatches)]
    after = [(i.htask, i.microbatch) for i in body[join:] if isinstance(i, Forward) and i.subgraph == 0]
    assert after == own[-tail:], "stream 0's last micro-batches, in order, after it joins stream 1"
    assert all(getattr(i, "stream", 0) == 0 for i in body[join:])


def simulated(seconds: float, peak: int) -> PhaseSimulation:
    return PhaseSimulation(0, seconds, (seconds,), 0.0, 0.0, (peak,), ())


def test_best_tail_is_the_shortest_round_that_fits() -> None:
    sims = {0: simulated(2.0, 10), 1: simulated(1.5, 10), 2: simulated(1.5, 10), 3: simulated(1.0, 99)}
    assert best_tail(sims, memory_limit=50) == 1, "the shortest fitting round; ties go to the shorter tail"
    assert best_tail(sims, memory_limit=100) == 3
    assert best_tail(sims, memory_limit=5) == 0, "nothing fits: no tail"


def test_several_rounds_per_body_where_the_simulation_predicts_a_shorter_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three one-task hTasks on two lanes: meeting after every round leaves one lane idle; over
    a body of several rounds the lanes take turns. Checkpoints inside a body forbid it."""
    tasks = [{**task, "steps": 4, "save_every": 0} for task in default_tasks()]
    spec = load_job_spec(write_job(tmp_path, tasks))
    cpu_lanes_slowed(monkeypatch, 1.2)
    plan = compile_job(spec, fusion="no_fuse").plan
    monkeypatch.setattr(side_by_side_module, "MAX_ROUNDS_PER_BODY", 1)
    every_round = compile_job(spec, fusion="no_fuse").plan
    assert every_round.phases[0].rounds_per_body == 1
    per_body = plan.phases[0].rounds_per_body
    assert per_body > 1
    assert plan.predictions.est_seconds_per_round < every_round.predictions.est_seconds_per_round
    body = plan.programs[0].phases[0]
    assert {i.htask for i in body if isinstance(i, LoadBatches)} == set(range(per_body * len(plan.phases[0].htasks)))
    monkeypatch.setattr(side_by_side_module, "MAX_ROUNDS_PER_BODY", 4)
    saved = [{**task, "save_every": 1} for task in tasks]
    checkpointed = compile_job(load_job_spec(write_job(tmp_path / "saved", saved)), fusion="no_fuse").plan
    assert checkpointed.phases[0].rounds_per_body == 1, "a checkpoint after every round: one round per body"


def test_rounds_per_body_must_divide_the_phase_and_end_at_its_checkpoints() -> None:
    phase = make_phases(3)[0]
    rounds = phase.num_rounds

    def per_body(k: int) -> Phase:
        return dataclasses.replace(phase, rounds_per_body=k)

    assert body_rounds_allowed(per_body(1), ())
    assert body_rounds_allowed(per_body(rounds), (phase.last_round,))
    assert not body_rounds_allowed(per_body(rounds + 1), ())
    if rounds % 2 == 0:
        assert not body_rounds_allowed(per_body(2), (phase.first_round,))
