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
from plan_helpers import build_plan, make_task

from muxtune.plans import (
    SCHEMA_VERSION,
    BuildTasks,
    ExportAdapters,
    ForwardBackward,
    HTask,
    LoadBackbone,
    OptimizerStep,
    Plan,
    PlanError,
    Predictions,
    RankProgram,
    dump_plan,
    load_plan,
    plan_from_dict,
    plan_to_dict,
    save_plan,
    validate_plan,
)
from muxtune.specs import PeftSpec


def test_save_load_round_trip(plan: Plan, tmp_path: Path) -> None:
    path = save_plan(plan, tmp_path / "plan.yaml")
    assert path == tmp_path / "plan.yaml"
    assert load_plan(path) == plan


def test_dict_round_trip_and_key_order(plan: Plan) -> None:
    data = plan_to_dict(plan)
    assert list(data) == [
        "schema_version",
        "job",
        "fingerprint",
        "backbone",
        "cluster",
        "tasks",
        "htasks",
        "alignment",
        "programs",
        "predictions",
    ]
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["programs"][0]["round"][0] == {"op": "forward_backward", "htask": 0}
    assert plan_from_dict(data) == plan


def test_file_starts_with_schema_version(plan: Plan, tmp_path: Path) -> None:
    text = save_plan(plan, tmp_path / "p.yaml").read_text()
    assert text.startswith("schema_version: 1\n")
    assert "- {op: forward_backward, htask: 0}" in text


def test_saving_twice_is_byte_identical(plan: Plan, tmp_path: Path) -> None:
    first = save_plan(plan, tmp_path / "one.yaml")
    second = save_plan(load_plan(first), tmp_path / "two.yaml")
    assert first.read_bytes() == second.read_bytes()
    assert dump_plan(plan) == dump_plan(load_plan(first))


def test_int_where_float_expected_is_normalized(tmp_path: Path) -> None:
    tasks = tuple(replace(t, lr=1, weight_decay=0) for t in build_plan().tasks)
    odd = build_plan(tasks=tasks, predictions=Predictions(10, 4096, 2, None))
    first = save_plan(odd, tmp_path / "one.yaml")
    second = save_plan(load_plan(first), tmp_path / "two.yaml")
    assert first.read_bytes() == second.read_bytes()
    assert load_plan(first) == odd


def test_save_is_atomic_and_leaves_no_temp_files(plan: Plan, tmp_path: Path) -> None:
    target = tmp_path / "plan.yaml"
    save_plan(plan, target)
    before = target.read_bytes()
    broken = build_plan(backbone={"dims": (1, 2)})
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
        validate_plan(build_plan(backbone={"dims": (1, 2)}))


def test_plan_helpers(plan: Plan) -> None:
    assert plan.task("b").peft.r == 4
    assert plan.htask_of("c-2").id == 1
    assert plan.task("a").to_spec().name == "a"
    with pytest.raises(KeyError):
        plan.task("zzz")


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
    st.text(min_size=1, max_size=8),
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
    backbone=_backbones,
    seconds=st.none() | st.floats(min_value=0, max_value=1e9, allow_nan=False),
    split=st.integers(0, 4),
)
def test_round_trip_property(names, ranks, lrs, backbone, seconds, split) -> None:
    tasks = tuple(replace(make_task(n, r=ranks[i]), lr=lrs[i]) for i, n in enumerate(names))
    cut = min(split, len(names) - 1)
    groups = [tuple(names[:cut]), tuple(names[cut:])] if cut else [tuple(names)]
    htasks = tuple(HTask(i, g, 128 * len(g), (128,) * len(g)) for i, g in enumerate(groups))
    round_ = tuple(ForwardBackward(i) for i in range(len(htasks))) + (OptimizerStep(tuple(names)),)
    programs = tuple(
        RankProgram(rank, f"cuda:{rank}", (LoadBackbone(), BuildTasks(tuple(names))), round_, (ExportAdapters(),))
        for rank in range(2)
    )
    plan = build_plan(
        tasks=tasks,
        htasks=htasks,
        programs=programs,
        backbone=backbone,
        predictions=Predictions(3, 100, seconds, None),
    )
    text = dump_plan(plan)
    loaded = plan_from_dict(yaml.safe_load(text))
    assert loaded == plan
    assert dump_plan(loaded) == text


def test_peft_change_changes_fingerprint() -> None:
    a = build_plan()
    b = build_plan(tasks=(replace(a.tasks[0], peft=PeftSpec(r=16)),) + a.tasks[1:])
    assert a.fingerprint != b.fingerprint
    c = build_plan(htasks=(HTask(0, ("a",), 512, (512,)), HTask(1, ("b", "c-2"), 256, (128, 128))))
    assert c.fingerprint != a.fingerprint
