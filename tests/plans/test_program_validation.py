"""A plan that loads always runs: the rank programs are refused, naming the instruction, when a
section holds the wrong opcode, a reference does not exist, a round body uses a buffer before it
is produced or leaves a micro-batch or task unfinished, or the ranks' programs do not fit
together (unmatched or reordered messages, differing all-reduces, deadlocks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from plan_helpers import (
    PARTITION,
    Edit,
    build_data_parallel_plan,
    build_pipeline_plan,
    build_plan,
    edited,
    errors_of,
)

from muxtune.plans import (
    AllReduce,
    Backward,
    BuildTasks,
    Checkpoint,
    ExportAdapters,
    Forward,
    LoadBackbone,
    LoadBatches,
    LossBackward,
    OptimizerStep,
    Plan,
    Recv,
    Send,
    instruction_to_dict,
    plan_from_dict,
    plan_to_dict,
    references,
)
from muxtune.plans.dataflow import Dataflow

Body = list[dict[str, Any]]


def body(phase: int, edit: Callable[[Body], None], rank: int = 0) -> Edit:
    """``edit`` applied to one round body."""
    return lambda d: edit(d["programs"][rank]["phases"][phase])


def program(edit: Callable[[dict[str, Any]], None], rank: int = 0) -> Edit:
    return lambda d: edit(d["programs"][rank])


def swap(i: int, j: int) -> Callable[[Body], None]:
    def edit(items: Body) -> None:
        items[i], items[j] = items[j], items[i]

    return edit


def move(i: int, j: int) -> Callable[[Body], None]:
    return lambda items: items.insert(j, items.pop(i))


def insert(i: int, instruction: Any) -> Callable[[Body], None]:
    return lambda items: items.insert(i, instruction_to_dict(instruction))


def append(instruction: Any) -> Callable[[Body], None]:
    return lambda items: items.append(instruction_to_dict(instruction))


def update(i: int, **fields: Any) -> Callable[[Body], None]:
    return lambda items: items[i].update(fields)


# Programs, sections and references


def test_one_program_per_rank_in_rank_order() -> None:
    plan = build_pipeline_plan()
    assert errors_of(edited(plan, program(lambda p: p.update(rank=0), rank=1))) == [
        "programs[1].rank: must be 1 (programs are listed by rank), got 0"
    ]
    assert errors_of(edited(plan, lambda d: d["programs"].pop())) == [
        "programs: must hold one program per rank (placement.num_ranks = 2), got 1"
    ]


def test_program_stage_must_hold_the_rank() -> None:
    plan = build_pipeline_plan()
    assert errors_of(edited(plan, program(lambda p: p.update(stage=0), rank=1))) == [
        "programs[1].stage: stage 0 does not hold rank 1 (its ranks: 0)"
    ]
    assert errors_of(edited(plan, program(lambda p: p.update(stage=5), rank=1))) == [
        "programs[1].stage: no stage 5 (the placement has 2)"
    ]


def test_one_round_body_per_phase(plan: Plan) -> None:
    assert errors_of(edited(plan, program(lambda p: p["phases"].pop()))) == [
        "programs[0].phases: must hold one round body per phase (the plan has 3), got 2"
    ]


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            program(lambda p: p["prologue"].append(instruction_to_dict(Forward(0, 0, 0, 0)))),
            "programs[0].prologue[2]: forward cannot run in the prologue (only in a phase body)",
        ),
        (
            body(0, append(LoadBackbone(0))),
            "programs[0].phases[0][37]: load_backbone cannot run in a phase body (only in the prologue)",
        ),
        (
            body(2, insert(0, ExportAdapters())),
            "programs[0].phases[2][0]: export_adapters cannot run in a phase body (only in the epilogue)",
        ),
        (
            program(lambda p: p["epilogue"].append(instruction_to_dict(BuildTasks(("a",))))),
            "programs[0].epilogue[1]: build_tasks cannot run in the epilogue (only in the prologue)",
        ),
        (
            program(lambda p: p["epilogue"].append(instruction_to_dict(Checkpoint((6,))))),
            "programs[0].epilogue[1]: checkpoint cannot run in the epilogue (only in a phase body)",
        ),
    ],
)
def test_opcodes_only_in_their_sections(plan: Plan, edit: Edit, message: str) -> None:
    assert errors_of(edited(plan, edit)) == [message]


@pytest.mark.parametrize(
    "edit, message",
    [
        (body(0, update(4, htask=5)), "programs[0].phases[0][4].htask: no hTask 5 (phase 0 has 2)"),
        (body(0, update(1, htask=2)), "programs[0].phases[0][1].htask: no hTask 2 (phase 0 has 2)"),
        (
            body(1, update(3, microbatch=2)),
            "programs[0].phases[1][3].microbatch: no micro-batch 2 (hTask 0 of phase 1 has 2)",
        ),
        (body(0, update(5, subgraph=7)), "programs[0].phases[0][5].subgraph: no subgraph 7 (the partition has 3)"),
        (body(0, append(Send(0, 0, 0, False, 1))), "programs[0].phases[0][37].peer: no rank 1 (the placement has 1)"),
        (
            body(0, append(Send(0, 0, 0, False, 0))),
            "programs[0].phases[0][37].peer: must be another rank, got 0 (this program's rank)",
        ),
        (
            body(0, update(36, tasks=["a", "b", "c_2"])),
            "programs[0].phases[0][36].tasks: unknown task 'c_2' (did you mean 'c-2'?)",
        ),
        (
            body(1, update(19, tasks=["a", "b", "c-2"])),
            "programs[0].phases[1][19].tasks: task 'c-2' is not active in phase 1",
        ),
        (
            program(lambda p: p["prologue"][1].update(tasks=["a", "b", "c_2"])),
            "programs[0].prologue[1].tasks: unknown task 'c_2' (did you mean 'c-2'?)",
        ),
        (
            body(1, update(20, rounds=[3, 5])),
            "programs[0].phases[1][20].rounds: round(s) 5 lie outside phase 1 (rounds 3..4)",
        ),
        (
            body(1, update(20, rounds=[4, 3])),
            "programs[0].phases[1][20].rounds: must be strictly increasing, got [4, 3]",
        ),
    ],
)
def test_references_must_exist(plan: Plan, edit: Edit, message: str) -> None:
    assert errors_of(edited(plan, edit)) == [message]


def test_all_reduce_group(plan: Plan) -> None:
    assert errors_of(edited(plan, body(0, insert(36, AllReduce(("a",), (1, 2)))))) == [
        "programs[0].phases[0][36].group: no rank(s) 1, 2 (the placement has 1)",
        "programs[0].phases[0][36].group: must include this program's rank 0, got [1, 2]",
    ]
    assert plan_from_dict(edited(plan, body(0, insert(36, AllReduce(("a", "c-2"), (0,)))))).programs


def test_wrong_payload_fields(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        first, second = d["programs"][0]["phases"][0], d["programs"][0]["phases"][1]
        first[4] = {"op": "forward", "task": 0, "microbatch": 0, "subgraph": 0, "stream": 0}
        first[5] = {"op": "forward", "htask": "one", "microbatch": 0, "subgraph": 1, "stream": -1}
        first[2] = {"op": "record_event", "event": 5, "stream": 1}
        first[3] = {"op": "wait_event", "event": "two words", "stream": 0}
        first[36] = {"op": "optimizer_step", "tasks": []}
        first[35] = "free"
        second[20] = {"op": "checkpoint", "rounds": []}
        second[0] = {"op": "load_batches", "htask": 0, "stream": 0, "lane": 0}
        d["programs"][0]["epilogue"][0] = {"op": "export_adapters", "tasks": ["a"]}
        d["programs"][0]["phases"][2] = {"op": "forward"}

    errors = errors_of(edited(plan, edit))
    event_rule = "must be an event name (1-128 letters, digits, '_', '.', ':', '/', '-')"
    assert errors == [
        f"programs[0].phases[0][2].event: {event_rule}, got 5 (op record_event)",
        f"programs[0].phases[0][3].event: {event_rule}, got 'two words' (op wait_event)",
        "programs[0].phases[0][4].task: unknown key (did you mean 'htask'?) (op forward)",
        "programs[0].phases[0][4].htask: missing required key (op forward)",
        "programs[0].phases[0][5].htask: must be a non-negative integer, got 'one' (op forward)",
        "programs[0].phases[0][5].stream: must be a non-negative integer, got -1 (op forward)",
        "programs[0].phases[0][35]: must be a mapping with an 'op' key, got 'free'",
        "programs[0].phases[0][36].tasks: must be a non-empty list of task names, got [] (op optimizer_step)",
        "programs[0].phases[1][0].lane: unknown key (op load_batches)",
        "programs[0].phases[1][20].rounds: must be a non-empty list of non-negative integers, got [] (op checkpoint)",
        "programs[0].phases[2]: must be a list of instructions, got {'op': 'forward'}",
        "programs[0].epilogue[0].tasks: unknown key (op export_adapters)",
    ]


def test_wrong_bool_and_group_payloads() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["programs"][0]["phases"][0][2]["grad"] = "no"
        d["programs"][0]["phases"][0][4]["grad"] = 0

    errors = errors_of(edited(build_pipeline_plan(), edit))
    assert errors == [
        "programs[0].phases[0][2].grad: must be true or false, got 'no' (op send)",
        "programs[0].phases[0][4].grad: must be true or false, got 0 (op send)",
    ]
    group = errors_of(edited(build_data_parallel_plan(), body(0, update(19, group=[0, 0]))))
    assert group == ["programs[0].phases[0][19].group: must not repeat a number, got [0, 0] (op all_reduce)"]
    phases = errors_of(edited(build_plan(), program(lambda p: p.update(phases={}))))
    assert phases == ["programs[0].phases: must be a list of round bodies, got {}"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            program(lambda p: p["prologue"].reverse()),
            "programs[0].prologue: must start with the one load_backbone and hold no other",
        ),
        (
            program(lambda p: p["prologue"].pop(0)),
            "programs[0].prologue: must load the backbone (load_backbone) before anything else",
        ),
        (program(lambda p: p["prologue"].pop(1)), "programs[0].prologue: never builds task(s) 'a', 'b', 'c-2'"),
        (
            program(lambda p: p["prologue"].append({"op": "build_tasks", "tasks": ["b"]})),
            "programs[0].prologue[2]: builds task 'b' again (already built by prologue[1])",
        ),
        (
            program(lambda p: p["prologue"][1].update(tasks=["a", "b"])),
            "programs[0].prologue: never builds task(s) 'c-2'",
        ),
        (
            program(lambda p: p["prologue"][0].update(stage=1)),
            "programs[0].prologue[0].stage: must be 0 (this program's stage), got 1",
        ),
    ],
)
def test_prologue_sets_up_once(plan: Plan, edit: Edit, message: str) -> None:
    assert errors_of(edited(plan, edit)) == [message]


# One round body, simulated


@pytest.mark.parametrize(
    "edit, messages",
    [
        pytest.param(
            body(0, swap(4, 5)),
            [
                "programs[0].phases[0][4]: forward of subgraph 1 (hTask 0, micro-batch 0) uses 'h0' before it is "
                "produced (by the forward of subgraph(s) 0, or a recv)"
            ],
            id="buffer-used-before-produced",
        ),
        pytest.param(
            body(0, swap(6, 7)),
            [
                "programs[0].phases[0][6]: loss_backward (hTask 0, micro-batch 0) comes before the graph output(s) "
                "'hidden' exist (the forward of subgraph(s) 2, or a recv)"
            ],
            id="loss-before-output",
        ),
        pytest.param(
            body(0, swap(7, 8)),
            [
                "programs[0].phases[0][7]: backward of subgraph 2 (hTask 0, micro-batch 0) needs the gradient of "
                "'hidden', which does not exist yet ('hidden': loss_backward has not run)"
            ],
            id="backward-before-loss",
        ),
        pytest.param(
            body(0, swap(9, 10)),
            [
                "programs[0].phases[0][9]: backward of subgraph 0 (hTask 0, micro-batch 0) needs the gradient of "
                "'h0', which does not exist yet ('h0': subgraph(s) 1 have not run backward)"
            ],
            id="backward-before-output-gradient",
        ),
        pytest.param(
            body(0, insert(4, Backward(0, 1, 0, 0))),
            [
                "programs[0].phases[0][4]: backward of subgraph 0 (hTask 0, micro-batch 1) comes before its forward",
                "programs[0].phases[0][19]: runs backward of subgraph 0 (hTask 0, micro-batch 1) a second time",
            ],
            id="backward-before-forward",
        ),
        pytest.param(
            body(0, insert(8, LossBackward(0, 0, 0))),
            ["programs[0].phases[0][8]: runs loss_backward (hTask 0, micro-batch 0) a second time"],
            id="loss-twice",
        ),
        pytest.param(
            body(0, insert(5, Forward(0, 0, 0, 0))),
            ["programs[0].phases[0][5]: runs forward of subgraph 0 (hTask 0, micro-batch 0) a second time"],
            id="forward-twice",
        ),
        pytest.param(
            body(0, swap(10, 11)),
            [
                "programs[0].phases[0][10]: free (hTask 0, micro-batch 0) comes before the backward of subgraph(s) 0",
                "programs[0].phases[0][11]: backward of subgraph 0 (hTask 0, micro-batch 0) comes after the "
                "micro-batch is freed (at [10])",
            ],
            id="instruction-after-free",
        ),
        pytest.param(
            body(0, lambda items: items.pop(11)),
            [
                "programs[0].phases[0][35]: steps task 'a' before micro-batch(es) 0 of hTask 0 are freed",
                "programs[0].phases[0][35]: steps task 'b' before micro-batch(es) 0 of hTask 0 are freed",
                "programs[0].phases[0]: hTask 0 micro-batch 0 has no free",
            ],
            id="free-missing",
        ),
        pytest.param(
            body(0, update(36, tasks=["a", "b"])),
            ["programs[0].phases[0]: has no optimizer_step for task(s) 'c-2'; they would never finish"],
            id="task-never-stepped",
        ),
        pytest.param(
            body(0, move(36, 28)),
            ["programs[0].phases[0][28]: steps task 'c-2' before micro-batch(es) 1 of hTask 1 are freed"],
            id="step-before-free",
        ),
        pytest.param(
            body(0, append(OptimizerStep(("b",)))),
            ["programs[0].phases[0][37]: steps task 'b' twice in one round"],
            id="step-twice",
        ),
        pytest.param(
            body(0, lambda items: items.pop(1)),
            [
                "programs[0].phases[0][19]: forward of subgraph 0 (hTask 1, micro-batch 0) comes before "
                "load_batches of hTask 1"
            ],
            id="load-batches-missing",
        ),
        pytest.param(
            body(0, move(1, 20)),
            [
                "programs[0].phases[0][19]: forward of subgraph 0 (hTask 1, micro-batch 0) comes before "
                "load_batches of hTask 1"
            ],
            id="load-batches-late",
        ),
        pytest.param(
            body(0, insert(2, LoadBatches(0, 0))),
            ["programs[0].phases[0][2]: loads the batches of hTask 0 again (already at [0])"],
            id="load-batches-twice",
        ),
        pytest.param(
            body(0, lambda items: items.pop(2)),
            ["programs[0].phases[0][2]: waits for event 'loaded', which is not recorded earlier in this body"],
            id="wait-unrecorded-event",
        ),
        pytest.param(
            body(0, swap(2, 3)),
            ["programs[0].phases[0][2]: waits for event 'loaded', which is not recorded earlier in this body"],
            id="wait-before-record",
        ),
        pytest.param(
            body(1, swap(19, 20)),
            [
                "programs[0].phases[1][19]: checkpoints before the optimizer_step of task(s) 'a', 'b' (a checkpoint "
                "holds the state after the round)"
            ],
            id="checkpoint-before-step",
        ),
        pytest.param(
            body(1, append(Checkpoint((4,)))),
            ["programs[0].phases[1][21]: checkpoints a second time in one round body (first at [20])"],
            id="checkpoint-twice",
        ),
        pytest.param(
            lambda d: d["phases"][0]["htasks"][0].update(num_microbatches=3),
            [
                "programs[0].phases[0][36]: steps task 'a' before micro-batch(es) 2 of hTask 0 are freed",
                "programs[0].phases[0][36]: steps task 'b' before micro-batch(es) 2 of hTask 0 are freed",
                "programs[0].phases[0]: hTask 0 micro-batch(es) 2 never run (no instruction names them)",
            ],
            id="microbatch-never-run",
        ),
        pytest.param(
            body(0, append(AllReduce(("a",), (0,)))),
            ["programs[0].phases[0][37]: all-reduces task 'a' after its optimizer_step (at [36])"],
            id="all-reduce-after-step",
        ),
        pytest.param(
            body(0, insert(4, AllReduce(("a",), (0,)))),
            ["programs[0].phases[0][4]: all-reduces task 'a' before micro-batch(es) 0, 1 of hTask 0 have run backward"],
            id="all-reduce-before-backward",
        ),
    ],
)
def test_round_body_that_cannot_run_is_refused(plan: Plan, edit: Edit, messages: list[str]) -> None:
    assert errors_of(edited(plan, edit)) == messages


def test_micro_batch_left_unfinished(plan: Plan) -> None:
    errors = errors_of(edited(plan, body(0, lambda items: items.__delitem__(slice(8, 11)))))
    assert errors == [
        "programs[0].phases[0][8]: free (hTask 0, micro-batch 0) comes before the backward of subgraph(s) 0, 1, 2",
        "programs[0].phases[0]: hTask 0 micro-batch 0 has no backward of subgraph(s) 0, 1, 2",
    ]


def test_huge_counts_fail_fast(plan: Plan) -> None:
    errors = errors_of(edited(plan, lambda d: d["phases"][0]["htasks"][0].update(num_microbatches=10**15)))
    assert errors[-1] == (
        "programs[0].phases[0]: hTask 0 micro-batch(es) 2, 3, 4, 5, 6, 7, 8, 9, ... (999999999999998 in all) never "
        "run (no instruction names them)"
    )

    def edit(d: dict[str, Any]) -> None:
        d["placement"].update(num_ranks=10**15, num_devices=10**15, data_parallel=10**15)

    assert errors_of(edited(plan, edit)) == [
        "placement.stages[0].ranks: must hold tensor_parallel x data_parallel = 1000000000000000 ranks, got 1",
        "placement.stages: rank(s) 1, 2, 3, 4, 5, 6, 7, 8, ... (999999999999999 in all) are in no stage",
    ]


def test_problems_per_body_are_bounded(plan: Plan) -> None:
    errors = errors_of(edited(plan, body(0, lambda items: items.extend(items[4:12] * 10))))
    assert len(errors) == 21
    assert errors[0] == (
        "programs[0].phases[0][37]: forward of subgraph 0 (hTask 0, micro-batch 0) comes after the micro-batch is "
        "freed (at [11])"
    )
    assert errors[-1].startswith("programs[0].phases[0]: ") and errors[-1].endswith("more problems in this round body")


# Several ranks


def _rank_body(rank: int, phase: int, edit: Callable[[Body], None]) -> Edit:
    return body(phase, edit, rank)


def _later_first(items: Body) -> None:
    """Rank 1 handles micro-batch 1 before micro-batch 0."""
    items[1:17] = items[9:17] + items[1:9]


def _wait_for_gradient_first(items: Body) -> None:
    """Rank 0 waits for micro-batch 0's gradient before sending its activation."""
    items.insert(1, items.pop(5))


@pytest.mark.parametrize(
    "edit, messages",
    [
        pytest.param(
            _rank_body(0, 0, lambda items: items.pop(2)),
            [
                "programs[1].phases[0][1]: recv of the activation after subgraph 0 (hTask 0, micro-batch 0) from "
                "rank 0 has no matching send in programs[0].phases[0]"
            ],
            id="missing-send",
        ),
        pytest.param(
            _rank_body(1, 0, lambda items: items.pop(7)),
            [
                "programs[0].phases[0][5]: recv of the gradient after subgraph 0 (hTask 0, micro-batch 0) from "
                "rank 1 has no matching send in programs[1].phases[0]"
            ],
            id="missing-gradient-send",
        ),
        pytest.param(
            _rank_body(1, 1, _later_first),
            [
                "programs[1].phases[1][1]: recv of the activation after subgraph 0 (hTask 0, micro-batch 1) from "
                "rank 0 comes out of order: rank 0 sends the activation after subgraph 0 (hTask 0, micro-batch 0) "
                "first (messages between two ranks arrive in the order they are sent)",
                "programs[0].phases[1][5]: recv of the gradient after subgraph 0 (hTask 0, micro-batch 0) from "
                "rank 1 comes out of order: rank 1 sends the gradient after subgraph 0 (hTask 0, micro-batch 1) "
                "first (messages between two ranks arrive in the order they are sent)",
            ],
            id="out-of-order",
        ),
        pytest.param(
            _rank_body(0, 0, _wait_for_gradient_first),
            [
                "programs[0].phases[0][1]: recv of the gradient after subgraph 0 (hTask 0, micro-batch 0) from "
                "rank 1 waits forever (deadlock: rank 1 is itself blocked at programs[1].phases[0][1])",
                "programs[1].phases[0][1]: recv of the activation after subgraph 0 (hTask 0, micro-batch 0) from "
                "rank 0 waits forever (deadlock: rank 0 is itself blocked at programs[0].phases[0][1])",
            ],
            id="deadlock",
        ),
        pytest.param(
            _rank_body(1, 0, move(7, 6)),
            [
                "programs[1].phases[0][6]: send of the gradient after subgraph 0 (hTask 0, micro-batch 0) to rank 0 "
                "needs the gradient of 'h0', which does not exist yet ('h0': subgraph(s) 1 have not run backward)"
            ],
            id="gradient-sent-before-it-exists",
        ),
        pytest.param(
            _rank_body(0, 0, swap(5, 6)),
            [
                "programs[0].phases[0][5]: backward of subgraph 0 (hTask 0, micro-batch 0) needs the gradient of "
                "'h0', which does not exist yet ('h0': no gradient from subgraph(s) 1, 2 was received)"
            ],
            id="backward-before-gradient-recv",
        ),
        pytest.param(
            _rank_body(1, 0, update(1, subgraph=1)),
            [
                "programs[1].phases[0][1]: recv of the activation after subgraph 1 (hTask 0, micro-batch 0) from "
                "rank 0: subgraph 1 runs on this rank's stage, but a rank receives the activation after a subgraph "
                "of another stage",
                "programs[1].phases[0][2]: forward of subgraph 1 (hTask 0, micro-batch 0) uses 'h0' before it is "
                "produced (by the forward of subgraph(s) 0, or a recv)",
                "programs[1].phases[0][3]: forward of subgraph 2 (hTask 0, micro-batch 0) uses 'h0' before it is "
                "produced (by the forward of subgraph(s) 0, or a recv)",
                "programs[0].phases[0][2]: send of the activation after subgraph 0 (hTask 0, micro-batch 0) to "
                "rank 1 has no matching recv in programs[1].phases[0]",
                "programs[1].phases[0][1]: recv of the activation after subgraph 1 (hTask 0, micro-batch 0) from "
                "rank 0 has no matching send in programs[0].phases[0]",
            ],
            id="recv-of-own-stage",
        ),
        pytest.param(
            _rank_body(0, 0, insert(2, Forward(0, 0, 1, 0))),
            [
                "programs[0].phases[0][2]: forward of subgraph 1 (hTask 0, micro-batch 0): subgraph 1 runs on stage 1, "
                "not this rank's 0"
            ],
            id="forward-of-another-stage",
        ),
        pytest.param(
            _rank_body(0, 0, insert(2, LossBackward(0, 0, 0))),
            [
                "programs[0].phases[0][2]: loss_backward (hTask 0, micro-batch 0): the loss runs on the last stage "
                "(1, which holds the head), not this rank's 0"
            ],
            id="loss-on-another-stage",
        ),
        pytest.param(
            _rank_body(0, 0, insert(3, Send(0, 0, 0, False, 1))),
            [
                "programs[0].phases[0][3]: send of the activation after subgraph 0 (hTask 0, micro-batch 0) to rank 1 "
                "again (already at [2])",
                "programs[0].phases[0][3]: send of the activation after subgraph 0 (hTask 0, micro-batch 0) to rank 1 "
                "has no matching recv in programs[1].phases[0]",
            ],
            id="send-twice",
        ),
        pytest.param(
            _rank_body(1, 0, insert(2, Recv(0, 0, 0, False, 0))),
            [
                "programs[1].phases[0][2]: recv of the activation after subgraph 0 (hTask 0, micro-batch 0) from "
                "rank 0 again (already at [1])",
                "programs[1].phases[0][2]: recv of the activation after subgraph 0 (hTask 0, micro-batch 0) from "
                "rank 0 has no matching send in programs[0].phases[0]",
            ],
            id="recv-twice",
        ),
        pytest.param(
            _rank_body(1, 0, update(7, grad=False)),
            [
                "programs[1].phases[0][7]: send of the activation after subgraph 0 (hTask 0, micro-batch 0) to "
                "rank 0: subgraph 0 runs on stage 0, but a rank sends the activation after a subgraph of its own "
                "stage",
                "programs[1].phases[0][7]: send of the activation after subgraph 0 (hTask 0, micro-batch 0) to "
                "rank 0 has no matching recv in programs[0].phases[0]",
                "programs[0].phases[0][5]: recv of the gradient after subgraph 0 (hTask 0, micro-batch 0) from "
                "rank 1 has no matching send in programs[1].phases[0]",
            ],
            id="send-from-another-stage",
        ),
    ],
)
def test_pipeline_programs_must_fit_together(edit: Edit, messages: list[str]) -> None:
    assert errors_of(edited(build_pipeline_plan(), edit)) == messages


def test_missing_recv_names_the_send() -> None:
    errors = errors_of(edited(build_pipeline_plan(), _rank_body(1, 0, lambda items: items.pop(1))))
    assert (
        "programs[0].phases[0][2]: send of the activation after subgraph 0 (hTask 0, micro-batch 0) to rank 1 "
        "has no matching recv in programs[1].phases[0]"
    ) in errors
    assert (
        "programs[1].phases[0][1]: forward of subgraph 1 (hTask 0, micro-batch 0) uses 'h0' before it is produced "
        "(by the forward of subgraph(s) 0, or a recv)"
    ) in errors


def test_all_reduces_must_agree() -> None:
    plan = build_data_parallel_plan()
    assert errors_of(edited(plan, _rank_body(1, 0, update(19, tasks=["a"])))) == [
        "programs[1].phases[0]: its all-reduces over ranks 0, 1 (tasks [['a']]) differ from programs[0].phases[0]'s "
        "(tasks [['a', 'b']])"
    ]
    assert errors_of(edited(plan, _rank_body(1, 1, lambda items: items.pop(19)))) == [
        "programs[1].phases[1]: its all-reduces over ranks 0, 1 (tasks []) differ from programs[0].phases[1]'s "
        "(tasks [['a']])"
    ]
    assert errors_of(edited(plan, _rank_body(1, 0, update(19, group=[0])))) == [
        "programs[1].phases[0][19].group: must include this program's rank 1, got [0]"
    ]


def test_dataflow_of_the_partition() -> None:
    flow = Dataflow.of(PARTITION)
    assert flow.producer == {"h0": 0, "lora_1": 1, "hidden": 2}
    assert flow.readers["h0"] == (1, 2)
    assert flow.readers["hidden"] == (flow.loss,) == (3,)
    assert flow.boundaries == (("h0",), ("h0", "lora_1"), ("hidden",))
    assert Dataflow.of(build_pipeline_plan().partition).on_stage(1) == (1, 2)


def test_partition_size_is_bounded(plan: Plan, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(references, "MAX_CROSSINGS", 3)
    assert errors_of(plan_to_dict(plan)) == [
        "partition: its values cross 4 cuts between subgraphs in all, more than the 3 a plan may hold"
    ]
