"""Plans survive save/load exactly, and the file text is deterministic."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from plan_helpers import (
    BACKBONE,
    build_data_parallel_plan,
    build_pipeline_plan,
    build_plan,
    make_phases,
    make_task,
    one_rank_body,
)

from muxtune.plans import (
    SCHEMA_VERSION,
    BuildTasks,
    ExportAdapters,
    HTask,
    LoadBackbone,
    Plan,
    PlanError,
    Predictions,
    RankProgram,
    SolverReport,
    dump_plan,
    load_plan,
    plan_from_dict,
    plan_to_dict,
    save_plan,
    validate_plan,
)
from muxtune.specs import LoraSpec


def test_save_load_round_trip(plan: Plan, tmp_path: Path) -> None:
    path = save_plan(plan, tmp_path / "plan.yaml")
    assert path == tmp_path / "plan.yaml"
    assert load_plan(path) == plan


@pytest.mark.parametrize("build", [build_pipeline_plan, build_data_parallel_plan])
def test_multi_rank_plans_round_trip(build, tmp_path: Path) -> None:
    plan = build()
    assert load_plan(save_plan(plan, tmp_path / "plan.yaml")) == plan


def test_dict_round_trip_and_key_order(plan: Plan) -> None:
    data = plan_to_dict(plan)
    assert list(data) == [
        "schema_version",
        "job",
        "fingerprint",
        "backbone",
        "placement",
        "partition",
        "tasks",
        "alignment",
        "phases",
        "programs",
        "predictions",
        "solver",
    ]
    assert data["schema_version"] == SCHEMA_VERSION == 2
    program = data["programs"][0]
    assert list(program) == ["rank", "device", "stage", "prologue", "phases", "epilogue"]
    assert len(program["phases"]) == len(plan.phases) == 3
    assert program["prologue"][0] == {"op": "load_backbone", "stage": 0}
    assert program["phases"][0][4] == {"op": "forward", "htask": 0, "microbatch": 0, "subgraph": 0, "stream": 0}
    assert list(data["phases"][0]["htasks"][0]) == [
        "id",
        "tasks",
        "micro_batch_tokens",
        "token_budgets",
        "num_microbatches",
    ]
    assert plan_from_dict(data) == plan


def test_file_layout(plan: Plan, tmp_path: Path) -> None:
    text = save_plan(plan, tmp_path / "p.yaml").read_text()
    assert text.startswith("schema_version: 2\n")
    assert "\n  - {op: load_backbone, stage: 0}\n" in text
    assert "\n  - - {op: load_batches, htask: 0, stream: 0}\n    - {op: load_batches, htask: 1, stream: 0}\n" in text
    assert "\n    - {op: forward, htask: 0, microbatch: 0, subgraph: 0, stream: 0}\n" in text
    assert "\n    - {op: checkpoint, rounds: [3, 4]}\n" in text
    assert "\n  - {op: export_adapters}\n" in text


def test_long_instructions_stay_on_one_line(tmp_path: Path) -> None:
    names = [f"task-with-a-long-name-{i}" for i in range(12)]
    tasks = tuple(make_task(name, steps=2) for name in names)
    plan = build_plan(tasks=tasks)
    text = dump_plan(plan)
    step = next(line for line in text.splitlines() if "optimizer_step" in line)
    assert len(step) > 200
    assert step.strip() == "- {op: optimizer_step, tasks: [" + ", ".join(names) + "]}"
    assert load_plan(save_plan(plan, tmp_path / "p.yaml")) == plan


def test_saving_twice_is_byte_identical(plan: Plan, tmp_path: Path) -> None:
    first = save_plan(plan, tmp_path / "one.yaml")
    second = save_plan(load_plan(first), tmp_path / "two.yaml")
    assert first.read_bytes() == second.read_bytes()
    assert dump_plan(plan) == dump_plan(load_plan(first))


def test_int_where_float_expected_is_normalized(tmp_path: Path) -> None:
    tasks = tuple(replace(t, lr=1, weight_decay=0) for t in build_plan().tasks)
    odd = build_plan(tasks=tasks, predictions=Predictions(6, 4096, 2, None))
    first = save_plan(odd, tmp_path / "one.yaml")
    second = save_plan(load_plan(first), tmp_path / "two.yaml")
    assert first.read_bytes() == second.read_bytes()
    assert load_plan(first) == odd


def test_save_is_atomic_and_leaves_no_temp_files(plan: Plan, tmp_path: Path) -> None:
    target = tmp_path / "plan.yaml"
    save_plan(plan, target)
    before = target.read_bytes()
    broken = build_plan(backbone={**BACKBONE, "dims": (1, 2)})
    with pytest.raises(PlanError) as info:
        save_plan(broken, target)
    assert "backbone.dims" in str(info.value)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["plan.yaml"]


def test_save_creates_parent_folders(plan: Plan, tmp_path: Path) -> None:
    path = save_plan(plan, tmp_path / "a" / "b" / "plan.yaml")
    assert load_plan(path) == plan


def test_validate_plan_rejects_non_plain_backbone() -> None:
    with pytest.raises(PlanError, match=r"backbone\.dims: must be JSON-like"):
        validate_plan(build_plan(backbone={**BACKBONE, "dims": (1, 2)}))


def test_plan_helpers(plan: Plan) -> None:
    assert plan.task("b").peft.r == 4
    assert plan.phases[0].htask_of("c-2").id == 1
    assert plan.phases[1].last_round == 4
    assert plan.num_rounds == 6
    assert plan.task("a").to_spec().name == "a"
    with pytest.raises(KeyError):
        plan.task("zzz")
    with pytest.raises(KeyError):
        plan.phases[2].htask_of("b")


def test_no_torch_import(tmp_path: Path, plan: Plan) -> None:
    path = save_plan(plan, tmp_path / "plan.yaml")
    code = (
        "import sys\n"
        "import muxtune.plans, muxtune.specs\n"
        f"muxtune.plans.load_plan({str(path)!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


_names = st.lists(st.from_regex(r"[a-z0-9_-]{1,8}", fullmatch=True), min_size=1, max_size=5, unique=True)
_floats = st.floats(min_value=1e-12, max_value=1e6, allow_nan=False, allow_infinity=False)
_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**62), 2**62),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_backbones = st.dictionaries(
    st.text(min_size=1, max_size=8).filter(lambda key: key != "num_layers"),
    st.recursive(
        _json_scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=8,
    ),
    max_size=6,
)


@settings(max_examples=60, deadline=None, database=None)
@given(
    names=_names,
    ranks=st.lists(st.integers(1, 64), min_size=5, max_size=5),
    lrs=st.lists(_floats, min_size=5, max_size=5),
    steps=st.lists(st.integers(1, 4), min_size=5, max_size=5),
    backbone=_backbones,
    seconds=st.none() | st.floats(min_value=0, max_value=1e9, allow_nan=False),
    split=st.integers(0, 4),
    microbatches=st.integers(1, 3),
)
def test_round_trip_property(names, ranks, lrs, steps, backbone, seconds, split, microbatches) -> None:
    tasks = tuple(replace(make_task(n, r=ranks[i], steps=steps[i]), lr=lrs[i]) for i, n in enumerate(names))
    phases = make_phases(tasks, split, microbatches)
    bodies = tuple(one_rank_body(p, (p.last_round,)) for p in phases)
    program = RankProgram(0, "cpu", 0, (LoadBackbone(0), BuildTasks(tuple(names))), bodies, (ExportAdapters(),))
    plan = build_plan(
        tasks=tasks,
        phases=phases,
        programs=(program,),
        backbone={**backbone, "num_layers": 2},
        predictions=Predictions(max(steps), 100, seconds, None),
    )
    text = dump_plan(plan)
    loaded = plan_from_dict(yaml.safe_load(text))
    assert loaded == plan
    assert dump_plan(loaded) == text


def test_structure_changes_change_fingerprint() -> None:
    a = build_plan()
    b = build_plan(tasks=(replace(a.tasks[0], peft=LoraSpec(r=16)),) + a.tasks[1:])
    assert a.fingerprint != b.fingerprint
    first = a.phases[0]
    regrouped = replace(first, htasks=(HTask(0, ("a",), 256, (256,), 2), HTask(1, ("b", "c-2"), 512, (256, 256), 2)))
    c = build_plan(phases=(regrouped,) + a.phases[1:])
    assert c.fingerprint != a.fingerprint
    d = build_pipeline_plan()
    e = build_pipeline_plan(partition=replace(d.partition, policy="other"))
    assert d.fingerprint != e.fingerprint


def test_solver_reports_round_trip_and_older_plans_read_the_fastest_as_chosen(plan: Plan) -> None:
    reports = tuple(
        SolverReport(p.id, "cp-sat", "OPTIMAL", 4.0 + p.id, 3.9, 0.0, 0.5, 1, 3.9 + p.id) for p in plan.phases
    )
    with_reports = replace(plan, solver=reports)
    data = plan_to_dict(with_reports)
    assert plan_from_dict(data) == with_reports
    for report in data["solver"]:
        del report["fastest_seconds"]
    older = plan_from_dict(data)
    assert [r.fastest_seconds for r in older.solver] == [r.objective_seconds for r in reports]
