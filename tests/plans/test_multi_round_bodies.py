"""Round bodies of several rounds (`Phase.rounds_per_body`): a body the emit pass builds is valid
and survives the file; bodies that could not run, or do not fit their phase, are refused with
the instruction or field named."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from plan_helpers import TASKS, build_data_parallel_plan, build_plan, errors_of, make_phases, one_rank_body

from muxtune.compiler.passes.emit import RankRole, multi_round_body, stepped_event
from muxtune.compiler.passes.streams import schedule_rounds
from muxtune.plans import (
    Checkpoint,
    Instruction,
    LoadBatches,
    OptimizerStep,
    Plan,
    WaitEvent,
    plan_from_dict,
    plan_to_dict,
    validate_plan,
)

ONE_RANK = RankRole(0, 1, (0, 1, 2), None, None, None, ())

Body = list[Instruction]


def two_round_plan(edit: Callable[[Body], None] | None = None, rounds_per_body: int = 2) -> Plan:
    """The helper plan with its first phase (rounds 1-2: hTasks (a, b) and (c-2,)) in one body
    of two rounds on two streams, each hTask's second round on the other stream."""
    phases = list(make_phases(TASKS))
    first = dataclasses.replace(phases[0], rounds_per_body=2)
    schedule = {0: 0, 1: 1, 3: 0, 2: 1}  # each hTask's second round on the other stream
    body = list(multi_round_body(first, ONE_RANK, TASKS, schedule))
    if edit is not None:
        edit(body)
    phases[0] = dataclasses.replace(first, rounds_per_body=rounds_per_body)
    bodies = (tuple(body), *(one_rank_body(p, (3, 4) if p.first_round == 3 else ()) for p in phases[1:]))
    base = build_plan(phases=tuple(phases))
    program = dataclasses.replace(base.programs[0], device="cpu", phases=bodies)
    placement = dataclasses.replace(base.placement, device="cpu")
    return dataclasses.replace(base, placement=placement, programs=(program,))


def test_schedule_rounds_evens_out_two_lanes() -> None:
    """One hTask too large to share evenly: with two rounds per body the lanes take turns."""
    seconds = {0: 0.383, 1: 0.419, 2: 1.106, 3: 0.729}
    schedule = schedule_rounds(seconds, 2, 2)
    assert sorted(schedule) == list(range(8))
    load = [0.0, 0.0]
    for instance, stream in schedule.items():
        load[stream] += seconds[instance % 4]
    assert max(load) / 2 < 1.33, "within 1% of an even split (1.318 s a round), against 1.489 s without"
    assert schedule[2] != schedule[6], "the largest hTask runs its two rounds on different lanes"
    assert list(schedule)[0] == 2, "the largest hTask starts first"


def test_a_two_round_body_is_valid_and_survives_the_file() -> None:
    plan = validate_plan(two_round_plan())
    body = plan.programs[0].phases[0]
    assert {i.htask for i in body if isinstance(i, LoadBatches)} == {0, 1, 2, 3}
    assert [i.stream for i in body if isinstance(i, OptimizerStep)] == [0, 1, 0, 1]
    assert WaitEvent(stepped_event(0), 1) in body
    assert plan_from_dict(plan_to_dict(plan)) == plan


def _drop_wait(body: Body) -> None:
    body.remove(next(i for i in body if isinstance(i, WaitEvent) and i.event.startswith("htask-")))


def _drop_last_step(body: Body) -> None:
    del body[max(k for k, i in enumerate(body) if isinstance(i, OptimizerStep))]


def _step_on_other_stream(body: Body) -> None:
    k = next(k for k, i in enumerate(body) if isinstance(i, OptimizerStep) and i.stream == 1)
    body[k] = dataclasses.replace(body[k], stream=2)


def _checkpoint_at_round_one(body: Body) -> None:
    body[-1] = Checkpoint((1, 2))


@pytest.mark.parametrize(
    ("edit", "rounds_per_body", "message"),
    [
        (_drop_wait, 2, "programs[0].phases[0]["),
        (_drop_last_step, 2, "steps task(s) 'a', 'b' fewer than 2 times (once per round of the body)"),
        (_step_on_other_stream, 2, "on stream 2; its hTask"),
        (_checkpoint_at_round_one, 2, "round(s) 1 end no round body (phase 0 runs 2 rounds per body from round 1)"),
        (None, 3, "phases[0].rounds_per_body: must divide the phase's 2 rounds, got 3"),
    ],
    ids=["no-wait-for-the-step", "one-step-short", "step-on-a-foreign-stream", "checkpoint-inside", "3-of-2"],
)
def test_a_multi_round_body_that_cannot_run_is_refused(
    edit: Callable[[Body], None] | None, rounds_per_body: int, message: str
) -> None:
    errors = errors_of(plan_to_dict(two_round_plan(edit, rounds_per_body)))
    assert any(message in e for e in errors), errors
    if edit is _drop_wait:
        assert any("without waiting for task" in e and "optimizer_step of the round before" in e for e in errors)


def test_several_rounds_per_body_need_one_cpu_rank() -> None:
    plan = build_data_parallel_plan()
    phases = (dataclasses.replace(plan.phases[0], rounds_per_body=2), *plan.phases[1:])
    errors = errors_of(plan_to_dict(dataclasses.replace(plan, phases=phases)))
    assert any("rounds_per_body: must be 1 in a plan of 2 ranks" in e for e in errors), errors
    on_cpu = two_round_plan()
    errors = errors_of(
        plan_to_dict(dataclasses.replace(on_cpu, placement=dataclasses.replace(on_cpu.placement, device="h100")))
    )
    assert any("rounds_per_body: must be 1 on device 'h100'" in e for e in errors), errors
