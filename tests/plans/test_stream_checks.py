"""Round bodies whose hTasks run on several streams: accepted when each hTask keeps one stream, the
other streams start after an event of stream 0 and stream 0 joins them before the optimizer
step; refused, naming the instruction, otherwise."""

from __future__ import annotations

import dataclasses

from plan_helpers import PARTITION, build_plan, edited, errors_of, passes

from muxtune.plans import (
    Checkpoint,
    Forward,
    Free,
    Instruction,
    LoadBatches,
    OptimizerStep,
    Phase,
    Plan,
    RecordEvent,
    WaitEvent,
    plan_from_dict,
    plan_to_dict,
)


def _on(stream: int, instructions: list[Instruction]) -> list[Instruction]:
    return [dataclasses.replace(i, stream=stream) if hasattr(i, "stream") else i for i in instructions]


def two_stream_body(phase: Phase, join: bool = True, start: bool = True) -> list[Instruction]:
    """hTask 0 on stream 0, hTask 1 on stream 1, each micro-batch through every subgraph; stream
    1 waits for stream 0's start of the round (unless not ``start``) and stream 0 waits for stream
    1 before the step (unless not ``join``)."""
    body: list[Instruction] = [RecordEvent("round-start", 0), WaitEvent("round-start", 1)] if start else []
    for h in phase.htasks:
        stream = h.id
        body.append(LoadBatches(h.id, stream))
        for m in range(h.num_microbatches):
            body += _on(stream, passes(h.id, m, range(len(PARTITION.subgraphs)))) + [Free(h.id, m, stream)]
    if join:
        body += [RecordEvent("stream-1-done", 1), WaitEvent("stream-1-done", 0)]
    return body + [OptimizerStep(phase.tasks)]


def with_first_body(plan: Plan, body: list[Instruction]) -> Plan:
    program = plan.programs[0]
    program = dataclasses.replace(program, phases=(tuple(body), *program.phases[1:]))
    return dataclasses.replace(plan, programs=(program,))


def first_phase_plan() -> Plan:
    """`build_plan` without its checkpoints (phase 0 has hTasks (a, b) and (c-2,))."""
    plan = build_plan()
    bodies = tuple(tuple(i for i in body if not isinstance(i, Checkpoint)) for body in plan.programs[0].phases)
    return dataclasses.replace(plan, programs=(dataclasses.replace(plan.programs[0], phases=bodies),))


def test_two_streams_joined_before_the_step_load() -> None:
    plan = first_phase_plan()
    plan = with_first_body(plan, two_stream_body(plan.phases[0]))
    assert plan_from_dict(plan_to_dict(plan)) == plan


def test_step_before_the_join_is_refused() -> None:
    plan = first_phase_plan()
    body = two_stream_body(plan.phases[0], join=False)
    errors = errors_of(plan_to_dict(with_first_body(plan, body)))
    last_on_1 = max(i for i, ins in enumerate(body) if getattr(ins, "stream", 0) == 1)
    assert errors == [
        f"programs[0].phases[0][{len(body) - 1}]: optimizer_step runs on stream 0 before stream 1's work up to "
        f"[{last_on_1}] is joined (record an event on stream 1 after it and wait for it on stream 0)"
    ]


def test_a_wait_on_another_stream_does_not_join_stream_0() -> None:
    plan = first_phase_plan()
    body = two_stream_body(plan.phases[0], join=False)
    body[-1:-1] = [RecordEvent("stream-1-done", 1), WaitEvent("stream-1-done", 2)]
    errors = errors_of(plan_to_dict(with_first_body(plan, body)))
    assert len(errors) == 1 and "optimizer_step runs on stream 0 before stream 1's work" in errors[0]


def test_an_htask_on_two_streams_is_refused() -> None:
    plan = first_phase_plan()
    body = two_stream_body(plan.phases[0])
    second = next(i for i, ins in enumerate(body) if isinstance(ins, Forward) and (ins.htask, ins.microbatch) == (0, 1))
    body[second] = dataclasses.replace(body[second], stream=1)
    errors = errors_of(plan_to_dict(with_first_body(plan, body)))
    first = body.index(LoadBatches(0, 0))
    assert errors[0] == (
        f"programs[0].phases[0][{second}]: hTask 0 runs on stream 0 (from [{first}]); this names stream 1 "
        "(an hTask's instructions share one stream)"
    )


def test_edited_stream_of_a_free_is_refused() -> None:
    plan = first_phase_plan()
    body = two_stream_body(plan.phases[0])
    free = next(i for i, ins in enumerate(body) if isinstance(ins, Free) and ins.htask == 1)

    def edit(data: dict) -> None:
        data["programs"][0]["phases"][0][free]["stream"] = 0

    errors = errors_of(edited(with_first_body(plan, body), edit))
    assert errors == [
        f"programs[0].phases[0][{free}]: hTask 1 runs on stream 1 (from [{body.index(LoadBatches(1, 1))}]); "
        "this names stream 0 (an hTask's instructions share one stream)"
    ]


def test_a_stream_that_starts_without_waiting_for_stream_0_is_refused() -> None:
    plan = first_phase_plan()
    body = two_stream_body(plan.phases[0], start=False)
    errors = errors_of(plan_to_dict(with_first_body(plan, body)))
    assert errors == [
        f"programs[0].phases[0][{body.index(LoadBatches(1, 1))}]: stream 1 starts work before it waits for an "
        "event of stream 0 (which orders it after the previous round's optimizer steps)"
    ]
