"""Loading refuses anything that is not exactly a valid schema-2 plan, and says why: version,
fingerprint, fields, placement, partition, tasks and phases (the rank programs are in
test_program_validation.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from node_paths import corrupted, node_paths
from plan_helpers import Edit, build_data_parallel_plan, build_pipeline_plan, build_plan, edited, errors_of

from muxtune.plans import Plan, PlanError, load_plan, plan_from_dict, plan_to_dict, save_plan

V1_MESSAGE = "schema_version: this runtime reads plan schema 2, the file has 1; compile the job again (muxtune-compile)"


def test_v1_plan_is_refused_with_one_message(plan: Plan) -> None:
    assert errors_of(edited(plan, lambda d: d.update(schema_version=1))) == [V1_MESSAGE]
    v1 = {
        "schema_version": 1,
        "job": {"model": "builtin:tiny-llama"},
        "cluster": {"device": "cpu", "num_devices": 1, "num_ranks": 1},
        "htasks": [{"id": 0, "tasks": ["a"]}],
        "programs": [{"rank": 0, "round": [{"op": "forward_backward", "htask": 0}]}],
    }
    assert errors_of(v1) == [V1_MESSAGE]


def test_other_schema_versions(plan: Plan) -> None:
    assert errors_of(edited(plan, lambda d: d.update(schema_version=3))) == [
        "schema_version: this runtime reads plan schema 2, the file has 3"
    ]
    assert errors_of(edited(plan, lambda d: d.pop("schema_version"))) == [
        "schema_version: missing; this runtime reads plan schema 2"
    ]
    assert errors_of(edited(plan, lambda d: d.update(schema_version="2"))) == [
        "schema_version: this runtime reads plan schema 2, the file has '2'"
    ]
    assert errors_of(edited(plan, lambda d: d.update(schema_version=True))) == [
        "schema_version: this runtime reads plan schema 2, the file has True"
    ]
    assert errors_of([1, 2])[0].startswith("plan: must be a mapping")


def test_changed_fingerprint_is_refused(plan: Plan) -> None:
    errors = errors_of(edited(plan, lambda d: d.update(fingerprint="0" * 64)))
    assert errors == [
        f"fingerprint: the plan says 000000000000..., its contents hash to {plan.fingerprint[:12]}...; "
        "the plan was edited or corrupted"
    ]


def test_malformed_fingerprint(plan: Plan) -> None:
    errors = errors_of(edited(plan, lambda d: d.update(fingerprint="abc")))
    assert errors == ["fingerprint: must be a sha256 hex digest (64 lowercase hex digits), got 'abc'"]


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["tasks"][0]["peft"].update(r=16),
        lambda d: d["backbone"].update(hidden_size=128),
        lambda d: d["partition"]["subgraphs"][1].update(digest="sha256:" + "9" * 16),
        lambda d: d["partition"].update(policy="layers"),
    ],
)
def test_structural_edit_breaks_fingerprint(plan: Plan, edit: Edit) -> None:
    assert errors_of(edited(plan, edit))[0].startswith("fingerprint: the plan says")


def test_hyperparameter_edit_keeps_fingerprint(plan: Plan) -> None:
    loaded = plan_from_dict(edited(plan, lambda d: d["tasks"][0].update(lr=1e-3)))
    assert loaded.tasks[0].lr == 1e-3
    assert loaded.fingerprint == plan.fingerprint


def test_removed_fields_are_named(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        del d["tasks"][1]["lr"]
        del d["tasks"][0]["peft"]["alpha"]
        del d["predictions"]
        del d["phases"][0]["htasks"][0]["num_microbatches"]
        del d["partition"]["subgraphs"][1]["digest"]
        del d["placement"]["stages"][0]["ranks"]
        del d["programs"][0]["stage"]
        del d["tasks"][0]["init_from"]
        del d["job"]["spec_path"]

    errors = errors_of(edited(plan, edit))
    for field in (
        "tasks[1].lr",
        "tasks[0].peft.alpha",
        "predictions",
        "phases[0].htasks[0].num_microbatches",
        "partition.subgraphs[1].digest",
        "placement.stages[0].ranks",
        "programs[0].stage",
        "tasks[0].init_from",
        "job.spec_path",
    ):
        assert f"{field}: missing required key" in errors


def test_extra_fields_are_named(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["tasks"][0]["btach_size"] = 4
        d["cluster"] = {}
        d["placement"]["num_rank"] = 2
        d["programs"][0]["round"] = []

    errors = errors_of(edited(plan, edit))
    assert "tasks[0].btach_size: unknown key (did you mean 'batch_size'?)" in errors
    assert "cluster: unknown key" in errors
    assert "placement.num_rank: unknown key (did you mean 'num_ranks'?)" in errors
    assert "programs[0].round: unknown key" in errors


def test_wrong_types(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["tasks"][0]["steps"] = "many"
        d["tasks"][1]["num_tokens"] = -1
        d["placement"]["num_ranks"] = True
        d["job"]["dtype"] = "fp64"
        d["alignment"]["pack_order"] = "random"
        d["backbone"]["bad"] = float("nan")
        d["partition"]["subgraphs"][0]["kind"] = "gpu"
        d["partition"]["subgraphs"][0]["first_layer"] = -2
        d["partition"]["subgraphs"][1]["digest"] = "abc"
        d["partition"]["inputs"] = []
        d["phases"][1]["tasks"] = ["a", "a"]
        d["placement"]["stages"][0]["ranks"] = [0, 0]

    errors = errors_of(edited(plan, edit))
    assert errors == [
        "job.dtype: must be one of 'fp32', 'bf16', 'fp16', got 'fp64' (did you mean 'fp16'?)",
        "backbone.bad: must be a finite number, got nan",
        "placement.stages[0].ranks: must not repeat a number, got [0, 0]",
        "placement.num_ranks: must be a positive integer, got True",
        "partition.subgraphs[0].kind: must be one of 'backbone', 'peft', 'collective', got 'gpu'",
        "partition.subgraphs[0].first_layer: must be an integer >= -1, got -2",
        "partition.subgraphs[1].digest: must be a node digest ('sha256:' and 16-64 lowercase hex digits), got 'abc'",
        "partition.inputs: must be a non-empty list of value names (non-empty strings), got []",
        "tasks[0].steps: must be a positive integer, got 'many'",
        "tasks[1].num_tokens: must be a non-negative integer, got -1",
        "alignment.pack_order: must be one of 'task_then_index', got 'random'",
        "phases[1].tasks: must not repeat a task name, got ['a', 'a']",
    ]


def test_relative_data_path_is_refused(plan: Plan) -> None:
    errors = errors_of(edited(plan, lambda d: d["tasks"][0]["data"].update(path="data/a.jsonl")))
    assert "tasks[0].data.path: must be an absolute path, got 'data/a.jsonl'" in errors


def test_duplicate_task_names(plan: Plan) -> None:
    errors = errors_of(edited(plan, lambda d: d["tasks"][2].update(name="a")))
    assert "tasks[2].name: duplicate task name 'a' (also tasks[0])" in errors


def test_many_errors_at_once(plan: Plan) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["tasks"][0]["lr"] = -1
        d["job"]["model"] = ""
        d["programs"][0]["phases"][0][0]["op"] = "fwd"
        d["predictions"]["num_rounds"] = -2

    assert len(errors_of(edited(plan, edit))) == 4


# Placement


def _placement_errors(plan: Plan, edit: Callable[[dict[str, Any]], None]) -> list[str]:
    return errors_of(edited(plan, lambda d: edit(d["placement"])))


def test_mesh_must_multiply_out() -> None:
    errors = _placement_errors(build_pipeline_plan(), lambda p: p.update(tensor_parallel=2))
    assert errors == [
        "placement.num_ranks: must be pipeline_parallel x tensor_parallel x data_parallel (2 x 2 x 1 = 4), got 2",
        "placement.stages[0].ranks: must hold tensor_parallel x data_parallel = 2 ranks, got 1",
        "placement.stages[1].ranks: must hold tensor_parallel x data_parallel = 2 ranks, got 1",
    ]


def test_one_stage_per_pipeline_stage() -> None:
    def edit(p: dict[str, Any]) -> None:
        p["pipeline_parallel"] = 1
        p["data_parallel"] = 2

    assert _placement_errors(build_pipeline_plan(), edit) == [
        "placement.stages: must hold one stage per pipeline stage (pipeline_parallel = 1), got 2",
        "placement.stages[0].ranks: must hold tensor_parallel x data_parallel = 2 ranks, got 1",
        "placement.stages[1].ranks: must hold tensor_parallel x data_parallel = 2 ranks, got 1",
    ]


def test_stage_ranks() -> None:
    def edit(p: dict[str, Any]) -> None:
        p["stages"][1]["ranks"] = [0]

    assert _placement_errors(build_pipeline_plan(), edit) == [
        "placement.stages[1].ranks[0]: rank 0 is already in placement.stages[0]",
        "placement.stages: rank(s) 1 are in no stage",
    ]
    assert _placement_errors(build_pipeline_plan(), lambda p: p["stages"][1].update(ranks=[5])) == [
        "placement.stages[1].ranks[0]: no rank 5 (placement.num_ranks = 2)",
        "placement.stages: rank(s) 1 are in no stage",
    ]


def test_stage_ids_and_layers() -> None:
    def edit(p: dict[str, Any]) -> None:
        p["stages"][0]["id"] = 1
        p["stages"][1]["first_layer"] = 2

    assert _placement_errors(build_pipeline_plan(), edit) == [
        "placement.stages[0].id: must be 0 (a stage's id is its position), got 1",
        "placement.stages[1].first_layer: must be 1 (stages hold consecutive layers, in order), got 2",
        "placement.stages[1].last_layer: must be >= first_layer (2), got 1",
    ]


def test_stages_must_end_at_the_last_layer(plan: Plan) -> None:
    assert _placement_errors(plan, lambda p: p["stages"][0].update(last_layer=0)) == [
        "placement.stages[0].last_layer: must be 1 (the last stage ends at the last layer, backbone.num_layers - 1), "
        "got 0"
    ]
    errors = errors_of(edited(plan, lambda d: d["backbone"].pop("num_layers")))
    assert errors == ["backbone.num_layers: must be a positive integer (the decoder layer count), it is missing"]


# Partition


def _partition_errors(plan: Plan, edit: Callable[[dict[str, Any]], None]) -> list[str]:
    return errors_of(edited(plan, lambda d: edit(d["partition"])))


def test_subgraph_ids_stages_and_layers() -> None:
    def edit(p: dict[str, Any]) -> None:
        p["subgraphs"][0]["id"] = 3
        p["subgraphs"][1]["stage"] = 0
        p["subgraphs"][2]["stage"] = 2

    assert _partition_errors(build_pipeline_plan(), edit) == [
        "partition.subgraphs[0].id: must be 0 (a subgraph's id is its position), got 3",
        "partition.subgraphs[1]: layers 1..1 lie outside stage 0's -1..0",
        "partition.subgraphs[2].stage: no stage 2 (the placement has 2)",
    ]


def test_subgraph_layers_never_go_back(plan: Plan) -> None:
    def edit(p: dict[str, Any]) -> None:
        p["subgraphs"][2]["first_layer"] = 0
        p["subgraphs"][2]["last_layer"] = 0

    assert _partition_errors(plan, edit) == [
        "partition.subgraphs[2].first_layer: must be >= the previous subgraph's (1; subgraphs are in execution "
        "order), got 0",
        "partition.subgraphs[2].last_layer: must be >= the previous subgraph's (1; subgraphs are in execution "
        "order), got 0",
    ]
    assert _partition_errors(plan, lambda p: p["subgraphs"][2].update(last_layer=0, first_layer=1)) == [
        "partition.subgraphs[2].last_layer: must be >= first_layer (1), got 0",
        "partition.subgraphs[2].last_layer: must be >= the previous subgraph's (1; subgraphs are in execution "
        "order), got 0",
    ]


def test_subgraph_nodes(plan: Plan) -> None:
    def edit(p: dict[str, Any]) -> None:
        p["subgraphs"][1]["last_node"] = "lora_2"
        p["subgraphs"][2]["first_node"] = "embed_tokens"
        p["subgraphs"][2]["num_nodes"] = 1

    assert _partition_errors(plan, edit) == [
        "partition.subgraphs[1].last_node: must be equal to first_node for a subgraph of 1 node(s), got 'lora_2'",
        "partition.subgraphs[2].last_node: must be equal to first_node for a subgraph of 1 node(s), got 'norm'",
        "partition.subgraphs[2].first_node: node 'embed_tokens' is already in partition.subgraphs[0]",
    ]


def test_values_flow_forward(plan: Plan) -> None:
    def edit(p: dict[str, Any]) -> None:
        p["subgraphs"][0]["inputs"] = ["input_ids", "lora_1", "mask"]
        p["subgraphs"][1]["outputs"] = ["lora_1", "h0"]
        p["inputs"] = ["input_ids", "position_ids", "layout", "hidden"]
        p["outputs"] = ["hidden", "logits"]

    assert _partition_errors(plan, edit) == [
        "partition.inputs[3]: 'hidden' is produced by partition.subgraphs[2]",
        "partition.outputs[1]: no subgraph produces 'logits'",
        "partition.subgraphs[0].inputs[1]: reads 'lora_1', which partition.subgraphs[1], later, produces",
        "partition.subgraphs[0].inputs[2]: reads 'mask', which no subgraph produces and which is not in "
        "partition.inputs",
        "partition.subgraphs[1].outputs[1]: 'h0' is already produced by partition.subgraphs[0]",
    ]
    errors = _partition_errors(plan, lambda p: p["subgraphs"][1].update(inputs=["h0", "lora_1"]))
    assert errors == ["partition.subgraphs[1].inputs[1]: reads 'lora_1', which this subgraph itself produces"]


# Tasks and phases


def _phase_errors(plan: Plan, edit: Callable[[list[dict[str, Any]]], None]) -> list[str]:
    return errors_of(edited(plan, lambda d: edit(d["phases"])))


def test_phase_ids_and_rounds(plan: Plan) -> None:
    def edit(phases: list[dict[str, Any]]) -> None:
        phases[1]["id"] = 5
        phases[0]["first_round"] = 2
        phases[0]["num_rounds"] = 1
        phases[2]["first_round"] = 6
        phases[2]["num_rounds"] = 1

    assert _phase_errors(plan, edit) == [
        "phases[0].first_round: must be 1 (the first phase starts at round 1), got 2",
        "phases[1].id: must be 1 (a phase's id is its position), got 5",
        "phases[2].first_round: must be 5 (phases follow each other without gaps), got 6",
    ]


def test_phase_must_end_where_a_task_finishes(plan: Plan) -> None:
    def edit(phases: list[dict[str, Any]]) -> None:
        phases[0]["num_rounds"] = 3
        phases[1]["first_round"] = 4
        phases[1]["num_rounds"] = 1

    assert _phase_errors(plan, edit) == [
        "phases[0]: task 'c-2' finishes at round 2, inside this phase (rounds 1..3); a phase must end where a task "
        "finishes"
    ]


def test_phase_tasks_are_exactly_the_active_ones(plan: Plan) -> None:
    def edit(phases: list[dict[str, Any]]) -> None:
        phases[1]["tasks"] = ["a", "c-2"]
        phases[1]["htasks"][0]["tasks"] = ["a", "c-2"]

    assert _phase_errors(plan, edit) == [
        "phases[1].tasks: misses task 'b', which is active in rounds 3..4 (it takes 4 steps)",
        "phases[1].tasks: task 'c-2' is not active in rounds 3..4 (it takes 2 steps)",
    ]


def test_phases_must_cover_every_step(plan: Plan) -> None:
    assert _phase_errors(plan, lambda phases: phases.pop()) == [
        "phases: the last phase ends at round 4, but task 'a' takes 6 steps (the phases must cover rounds 1..6)"
    ]
    assert _phase_errors(plan, lambda phases: phases[2].update(num_rounds=3)) == [
        "phases[2]: task 'a' finishes at round 6, inside this phase (rounds 5..7); a phase must end where a task "
        "finishes"
    ]
    assert _phase_errors(plan, lambda phases: phases.append({**phases[2], "id": 3, "first_round": 7})) == [
        "phases[3].tasks: task 'a' is not active in rounds 7..8 (it takes 6 steps)"
    ]


def test_unknown_task_in_a_phase(plan: Plan) -> None:
    def edit(phases: list[dict[str, Any]]) -> None:
        phases[2]["tasks"] = ["aa"]
        phases[2]["htasks"][0]["tasks"] = ["aa"]

    errors = _phase_errors(plan, edit)
    assert "phases[2].tasks[0]: unknown task 'aa' (did you mean 'a'?)" in errors
    assert "phases[2].htasks[0].tasks[0]: unknown task 'aa' (did you mean 'a'?)" in errors


def test_htasks_partition_the_phase(plan: Plan) -> None:
    def edit(phases: list[dict[str, Any]]) -> None:
        phases[0]["htasks"][0]["tasks"] = ["a", "zz"]
        phases[0]["htasks"][1]["tasks"] = ["c-2", "a"]
        phases[0]["htasks"][1]["token_budgets"] = [256, 256]
        phases[0]["htasks"][1]["micro_batch_tokens"] = 512
        phases[1]["htasks"][0]["tasks"] = ["a", "c-2"]

    assert _phase_errors(plan, edit) == [
        "phases[0].htasks[0].tasks[1]: unknown task 'zz'",
        "phases[0].htasks[1].tasks[1]: task 'a' is already in phases[0].htasks[0]",
        "phases[0].htasks: task 'b' is in no hTask",
        "phases[1].htasks[0].tasks[1]: task 'c-2' is not in phases[1].tasks",
        "phases[1].htasks: task 'b' is in no hTask",
    ]


def test_htask_ids_budgets_and_microbatches(plan: Plan) -> None:
    def edit(phases: list[dict[str, Any]]) -> None:
        htasks = phases[0]["htasks"]
        htasks[1]["id"] = 7
        htasks[0]["token_budgets"] = [256, 200]
        htasks[0]["micro_batch_tokens"] = 500
        htasks[1]["micro_batch_tokens"] = 0
        htasks[1]["num_microbatches"] = 0
        phases[1]["htasks"][0]["token_budgets"] = [512]

    assert _phase_errors(plan, edit) == [
        "phases[0].htasks[1].micro_batch_tokens: must be a positive integer, got 0",
        "phases[0].htasks[1].num_microbatches: must be a positive integer, got 0",
        "phases[0].htasks[0].token_budgets[1]: must be a multiple of alignment.chunk_size (64), got 200",
        "phases[0].htasks[0].micro_batch_tokens: must be the sum of token_budgets (456), got 500",
        "phases[0].htasks[1].id: must be 1 (an hTask's id is its position in its phase), got 7",
        "phases[1].htasks[0].token_budgets: must hold one budget per task (2), got 1",
    ]


# Files


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text("schema_version: 2\njob:\n  model: [unclosed\n  dtype: fp32\n")
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
    data["phases"][0]["htasks"][0]["tasks"] = ["b", "a"]
    data["phases"][0]["htasks"][0]["token_budgets"] = [256, 256]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(PlanError, match="^fingerprint: the plan says"):
        load_plan(path)


def test_v1_file_on_disk_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text("schema_version: 1\ncluster: {device: cpu}\nhtasks: []\n")
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert info.value.errors == [V1_MESSAGE]


def test_save_refuses_invalid_plan(tmp_path: Path) -> None:
    bad = build_plan()
    bad = Plan(**{**{f: getattr(bad, f) for f in bad.__dataclass_fields__}, "fingerprint": "f" * 64})
    with pytest.raises(PlanError, match="^fingerprint:"):
        save_plan(bad, tmp_path / "plan.yaml")
    assert not (tmp_path / "plan.yaml").exists()


@pytest.mark.parametrize("build", [build_plan, build_pipeline_plan, build_data_parallel_plan])
@pytest.mark.parametrize("junk", [None, "x", -1, 2.5, True, [], {}, "<delete>"])
def test_any_corruption_gives_a_plan_error(build: Callable[[], Plan], junk: Any) -> None:
    """Replacing or deleting any single node is refused with a named field, never a crash."""
    plan = build()
    for path in node_paths(plan_to_dict(plan)):
        data = corrupted(plan_to_dict(plan), path, junk, delete=junk == "<delete>")
        try:
            plan_from_dict(data)
        except PlanError as exc:
            assert exc.errors and "INVALID" not in str(exc) and "MISSING" not in str(exc), (path, str(exc))
