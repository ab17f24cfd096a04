"""Loading refuses anything that is not exactly a valid schema-1 plan, and says why."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from node_paths import corrupted, node_paths
from plan_helpers import build_plan

from muxtune.plans import Plan, PlanError, load_plan, plan_from_dict, plan_to_dict, save_plan


def _errors(data: Any) -> list[str]:
    with pytest.raises(PlanError) as info:
        plan_from_dict(data)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def _edited(plan: Plan, edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = plan_to_dict(plan)
    edit(data)
    return data


def test_other_schema_version_is_refused(plan: Plan) -> None:
    errors = _errors(_edited(plan, lambda d: d.update(schema_version=2)))
    assert errors == ["schema_version: this runtime reads plan schema 1, the file has 2"]


def test_missing_or_odd_schema_version(plan: Plan) -> None:
    assert _errors(_edited(plan, lambda d: d.pop("schema_version"))) == [
        "schema_version: missing; this runtime reads plan schema 1"
    ]
    assert "the file has '1'" in _errors(_edited(plan, lambda d: d.update(schema_version="1")))[0]
    assert "the file has True" in _errors(_edited(plan, lambda d: d.update(schema_version=True)))[0]
    assert _errors([1, 2])[0].startswith("plan: must be a mapping")


def test_changed_fingerprint_is_refused(plan: Plan) -> None:
    errors = _errors(_edited(plan, lambda d: d.update(fingerprint="0" * 64)))
    expected = plan.fingerprint[:12]
    assert errors == [
        f"fingerprint: the plan says 000000000000..., its contents hash to {expected}...; "
        "the plan was edited or corrupted"
    ]


def test_malformed_fingerprint(plan: Plan) -> None:
    errors = _errors(_edited(plan, lambda d: d.update(fingerprint="abc")))
    assert errors == ["fingerprint: must be a sha256 hex digest (64 lowercase hex digits), got 'abc'"]


def test_structural_edit_breaks_fingerprint(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["tasks"][0]["peft"]["r"] = 16

    assert _errors(_edited(plan, edit))[0].startswith("fingerprint: the plan says")

    def edit_backbone(d: dict[str, Any]) -> None:
        d["backbone"]["hidden_size"] = 128

    assert _errors(_edited(plan, edit_backbone))[0].startswith("fingerprint:")


def test_hyperparameter_edit_keeps_fingerprint(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["tasks"][0]["lr"] = 1e-3

    loaded = plan_from_dict(_edited(plan, edit))
    assert loaded.tasks[0].lr == 1e-3
    assert loaded.fingerprint == plan.fingerprint


def test_removed_field_is_named(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        del d["tasks"][1]["lr"]
        del d["tasks"][0]["peft"]["alpha"]
        del d["predictions"]
        del d["htasks"][0]["micro_batch_tokens"]

    errors = _errors(_edited(plan, edit))
    assert "tasks[1].lr: missing required key" in errors
    assert "tasks[0].peft.alpha: missing required key" in errors
    assert "predictions: missing required key" in errors
    assert "htasks[0].micro_batch_tokens: missing required key" in errors


def test_removed_optional_looking_fields_are_still_required(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        del d["tasks"][0]["init_from"]
        del d["tasks"][0]["schedule"]
        del d["job"]["spec_path"]
        del d["predictions"]["est_seconds_per_round"]

    errors = _errors(_edited(plan, edit))
    assert "tasks[0].init_from: missing required key" in errors
    assert "tasks[0].schedule: missing required key" in errors
    assert "job.spec_path: missing required key" in errors
    assert "predictions.est_seconds_per_round: missing required key" in errors


def test_extra_field_is_named(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["tasks"][0]["btach_size"] = 4
        d["placement"] = {}
        d["cluster"]["num_rank"] = 2

    errors = _errors(_edited(plan, edit))
    assert "tasks[0].btach_size: unknown key (did you mean 'batch_size'?)" in errors
    assert "placement: unknown key" in errors
    assert "cluster.num_rank: unknown key (did you mean 'num_ranks'?)" in errors


def test_wrong_types(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["tasks"][0]["steps"] = "many"
        d["tasks"][1]["num_tokens"] = -1
        d["cluster"]["num_ranks"] = True
        d["job"]["dtype"] = "fp64"
        d["alignment"]["pack_order"] = "random"
        d["backbone"]["bad"] = float("nan")

    errors = _errors(_edited(plan, edit))
    assert "tasks[0].steps: must be a positive integer, got 'many'" in errors
    assert "tasks[1].num_tokens: must be a non-negative integer, got -1" in errors
    assert "cluster.num_ranks: must be a positive integer, got True" in errors
    assert "job.dtype: must be one of 'fp32', 'bf16', 'fp16', got 'fp64' (did you mean 'fp16'?)" in errors
    assert "alignment.pack_order: must be one of 'task_then_index', got 'random'" in errors
    assert "backbone.bad: must be a finite number, got nan" in errors


def test_relative_data_path_is_refused(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["tasks"][0]["data"]["path"] = "data/a.jsonl"

    assert "tasks[0].data.path: must be an absolute path, got 'data/a.jsonl'" in _errors(_edited(plan, edit))


def test_unknown_op_names_the_instruction(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["programs"][0]["round"][2] = {"op": "fwd"}
        d["programs"][1]["prologue"][0] = {"op": "load_backbon"}

    errors = _errors(_edited(plan, edit))
    assert "programs[0].round[2]: unknown op 'fwd'" in errors
    assert "programs[1].prologue[0]: unknown op 'load_backbon' (did you mean 'load_backbone'?)" in errors


def test_wrong_payload_fields(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["programs"][0]["round"][0] = {"op": "forward_backward", "task": 0}
        d["programs"][0]["round"][1] = {"op": "forward_backward", "htask": "one"}
        d["programs"][0]["epilogue"][0] = {"op": "export_adapters", "tasks": ["a"]}
        d["programs"][1]["round"][2] = {"op": "optimizer_step", "tasks": []}
        d["programs"][1]["round"][3] = "checkpoint"

    errors = _errors(_edited(plan, edit))
    assert "programs[0].round[0].task: unknown key (did you mean 'htask'?) (op forward_backward)" in errors
    assert "programs[0].round[0].htask: missing required key (op forward_backward)" in errors
    assert "programs[0].round[1].htask: must be a non-negative integer, got 'one' (op forward_backward)" in errors
    assert "programs[0].epilogue[0].tasks: unknown key (op export_adapters)" in errors
    assert any(e.startswith("programs[1].round[2].tasks: must be a non-empty list of task names") for e in errors)
    assert "programs[1].round[3]: must be a mapping with an 'op' key, got 'checkpoint'" in errors


def test_bad_htask_reference(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["programs"][1]["round"][1]["htask"] = 5

    assert _errors(_edited(plan, edit)) == ["programs[1].round[1].htask: no hTask 5 (the plan has 2)"]


def test_unknown_task_in_instruction(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["programs"][0]["prologue"][1]["tasks"] = ["a", "b", "c_2"]

    errors = _errors(_edited(plan, edit))
    assert errors == ["programs[0].prologue[1].tasks: unknown task 'c_2' (did you mean 'c-2'?)"]


def test_htask_partition_errors(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["htasks"][0]["tasks"] = ["a", "zz"]
        d["htasks"][1]["tasks"] = ["c-2", "a"]

    errors = _errors(_edited(plan, edit))
    assert "htasks[0].tasks[1]: unknown task 'zz'" in errors
    assert "htasks[1].tasks[1]: task 'a' is already in htasks[0]" in errors
    assert "htasks: task 'b' is in no hTask" in errors


def test_htask_ids_and_budgets(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["htasks"][1]["id"] = 7
        d["htasks"][0]["token_budgets"] = [256, 200]
        d["htasks"][0]["micro_batch_tokens"] = 500
        d["htasks"][1]["micro_batch_tokens"] = 0

    errors = _errors(_edited(plan, edit))
    assert errors == [
        "htasks[1].micro_batch_tokens: must be a positive integer, got 0",
        "htasks[0].token_budgets[1]: must be a multiple of alignment.chunk_size (64), got 200",
        "htasks[0].micro_batch_tokens: must be the sum of token_budgets (456), got 500",
        "htasks[1].id: must be 1 (an hTask's id is its position), got 7",
    ]


def test_token_budget_shape(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["htasks"][0]["token_budgets"] = [512]
        d["htasks"][1]["token_budgets"] = [0]

    errors = _errors(_edited(plan, edit))
    assert errors == [
        "htasks[1].token_budgets: must be a non-empty list of positive integers, got [0]",
        "htasks[0].token_budgets: must hold one budget per task (2), got 1",
    ]


def test_program_per_rank(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["programs"][1]["rank"] = 0
        d["programs"][0]["round"] = []

    errors = _errors(_edited(plan, edit))
    assert "programs[1].rank: must be 1 (programs are listed by rank), got 0" in errors
    assert "programs[0].round: must hold at least one instruction" in errors
    assert _errors(_edited(plan, lambda d: d["programs"].pop())) == [
        "programs: must hold one program per rank (cluster.num_ranks = 2), got 1"
    ]


def test_task_that_never_steps_is_refused(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        for program in d["programs"]:
            program["round"][2]["tasks"] = ["a", "b"]

    errors = _errors(_edited(plan, edit))
    assert errors == [
        f"programs[{rank}].round: has no optimizer_step for task(s) 'c-2'; they would never finish" for rank in (0, 1)
    ]


def _rank0(edit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """``edit`` applied to rank 0's program only."""
    return lambda d: edit(d["programs"][0])


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            _rank0(lambda p: p["round"].pop(1)),
            "programs[0].round: has no forward_backward for task(s) 'c-2'",
        ),
        (
            _rank0(lambda p: p["round"].__setitem__(slice(0, 2), [])),
            "programs[0].round: has no forward_backward for task(s) 'a', 'b', 'c-2'",
        ),
        (
            _rank0(lambda p: p["round"].insert(0, p["round"].pop(2))),
            "programs[0].round[0]: steps task 'a' before its forward_backward in the round",
        ),
        (
            _rank0(lambda p: p["round"].insert(1, {"op": "forward_backward", "htask": 0})),
            "programs[0].round[1]: passes task 'a' forward twice in one round",
        ),
        (
            _rank0(lambda p: p["round"].insert(3, {"op": "optimizer_step", "tasks": ["b"]})),
            "programs[0].round[3]: steps task 'b' twice in one round",
        ),
        (
            _rank0(lambda p: p["prologue"].reverse()),
            "programs[0].prologue: must start with the one load_backbone and hold no other",
        ),
        (
            _rank0(lambda p: p["prologue"].pop(0)),
            "programs[0].prologue: must load the backbone (load_backbone) before anything else",
        ),
        (
            _rank0(lambda p: p["prologue"].pop(1)),
            "programs[0].prologue: never builds task(s) 'a', 'b', 'c-2'",
        ),
        (
            _rank0(lambda p: p["prologue"].append({"op": "build_tasks", "tasks": ["b"]})),
            "programs[0].prologue[2]: builds task 'b' again (already built by prologue[1])",
        ),
        (
            _rank0(lambda p: p["prologue"].__setitem__(1, {"op": "build_tasks", "tasks": ["a", "b"]})),
            "programs[0].prologue: never builds task(s) 'c-2'",
        ),
        (
            _rank0(lambda p: p["round"].append({"op": "export_adapters"})),
            "programs[0].round[4]: export_adapters cannot run in the round (only in: epilogue)",
        ),
        (
            _rank0(lambda p: p["epilogue"].append({"op": "build_tasks", "tasks": ["a"]})),
            "programs[0].epilogue[1]: build_tasks cannot run in the epilogue (only in: prologue)",
        ),
    ],
)
def test_program_that_cannot_run_is_refused(plan: Plan, edit: Callable[[dict[str, Any]], None], message: str) -> None:
    assert message in _errors(_edited(plan, edit))


def test_duplicate_task_names(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["tasks"][2]["name"] = "a"

    assert "tasks[2].name: duplicate task name 'a' (also tasks[0])" in _errors(_edited(plan, edit))


def test_many_errors_at_once(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["tasks"][0]["lr"] = -1
        d["job"]["model"] = ""
        d["programs"][0]["round"][0]["op"] = "fwd"
        d["predictions"]["num_rounds"] = -2

    assert len(_errors(_edited(plan, edit))) == 4


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text("schema_version: 1\njob:\n  model: [unclosed\n  dtype: fp32\n")
    with pytest.raises(PlanError) as info:
        load_plan(path)
    message = str(info.value)
    assert message.startswith(f"{path}:")
    assert "invalid YAML" in message
    assert f"{path}:5:" in message or f"{path}:4:" in message


def test_missing_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="file not found"):
        load_plan(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(PlanError, match="empty"):
        load_plan(tmp_path / "empty.yaml")


def test_edited_file_on_disk_is_refused(plan: Plan, tmp_path: Path) -> None:
    path = save_plan(plan, tmp_path / "plan.yaml")
    data = yaml.safe_load(path.read_text())
    data["htasks"] = [{"id": 0, "tasks": ["a", "b", "c-2"], "micro_batch_tokens": 768, "token_budgets": [256] * 3}]
    for program in data["programs"]:
        program["round"] = [r for r in program["round"] if r.get("htask") != 1]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(PlanError, match="^fingerprint: the plan says"):
        load_plan(path)


def test_save_refuses_invalid_plan(tmp_path: Path) -> None:
    bad = build_plan()
    bad = Plan(**{**{f: getattr(bad, f) for f in bad.__dataclass_fields__}, "fingerprint": "f" * 64})
    with pytest.raises(PlanError, match="^fingerprint:"):
        save_plan(bad, tmp_path / "plan.yaml")
    assert not (tmp_path / "plan.yaml").exists()


@pytest.mark.parametrize("junk", [None, "x", -1, 2.5, True, [], {}, "<delete>"])
def test_any_corruption_gives_a_plan_error(plan: Plan, junk: Any) -> None:
    """Replacing or deleting any single node is refused with a named field, never a crash."""
    for path in node_paths(plan_to_dict(plan)):
        data = corrupted(plan_to_dict(plan), path, junk, delete=junk == "<delete>")
        try:
            plan_from_dict(data)
        except PlanError as exc:
            assert exc.errors and "INVALID" not in str(exc) and "MISSING" not in str(exc), (
                path,
                str(exc),
            )
