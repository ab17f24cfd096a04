"""``key=value`` overrides: by task name, index, wildcard; bad ones name the override."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from spec_helpers import base_spec

from muxtune.specs import SpecError, load_job_spec, parse_job_spec

WriteSpec = Callable[..., Path]


def test_override_by_task_name(write_spec: WriteSpec) -> None:
    spec = load_job_spec(write_spec(), ["tasks.sentiment.lr=1e-4"])
    assert spec.task("sentiment").lr == 1e-4
    assert isinstance(spec.task("sentiment").lr, float)
    assert spec.task("qa").lr == 2e-4


def test_override_by_index_and_nested(write_spec: WriteSpec) -> None:
    spec = load_job_spec(
        write_spec(),
        [
            "tasks.1.peft.r=16",
            "tasks.1.schedule.name=linear",
            "tasks.0.peft.target_modules=[q_proj, k_proj]",
        ],
    )
    assert spec.tasks[1].peft.r == 16
    assert spec.tasks[1].schedule.name == "linear"
    assert spec.tasks[0].peft.target_modules == ("q_proj", "k_proj")


def test_wildcard_applies_to_every_task(write_spec: WriteSpec) -> None:
    spec = load_job_spec(write_spec(), ["tasks.*.steps=2", "tasks.*.schedule.warmup_steps=0"])
    assert [t.steps for t in spec.tasks] == [2, 2]
    assert [t.schedule.warmup_steps for t in spec.tasks] == [0, 0]


def test_top_level_and_new_sections(write_spec: WriteSpec, job_dir: Path) -> None:
    spec = load_job_spec(
        write_spec(), ["dtype=bf16", "cluster.device=cpu", "cluster.memory_gb=2.5", "output_dir=other"]
    )
    assert spec.dtype == "bf16"
    assert spec.cluster.device == "cpu" and spec.cluster.memory_gb == 2.5
    assert spec.output_dir == str(job_dir / "other")


def test_number_forms(write_spec: WriteSpec) -> None:
    spec = load_job_spec(write_spec(), ["tasks.0.lr=2.0e-4", "tasks.1.lr=3E-5", "tasks.0.weight_decay=1e-2"])
    assert spec.tasks[0].lr == 2e-4 and spec.tasks[1].lr == 3e-5 and spec.tasks[0].weight_decay == 0.01


def test_overrides_apply_in_order_and_do_not_touch_the_input(job_dir: Path) -> None:
    raw = base_spec()
    spec = parse_job_spec(raw, job_dir, ["tasks.qa.steps=5", "tasks.1.steps=6"])
    assert spec.task("qa").steps == 6
    assert "steps" not in raw["tasks"][1]


def test_null_override(write_spec: WriteSpec) -> None:
    assert load_job_spec(write_spec(), ["tasks.0.init_from=null"]).tasks[0].init_from is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tasks.sentiment.lr", "override 'tasks.sentiment.lr': expected key=value"),
        ("=3", "override '=3': expected key=value"),
        ("tasks..lr=1", "override 'tasks..lr=1': malformed key 'tasks..lr'"),
        (
            "tasks.nope.lr=1e-4",
            "override 'tasks.nope.lr=1e-4': no task named 'nope' in tasks (names: sentiment, qa)",
        ),
        ("tasks.5.lr=1e-4", "override 'tasks.5.lr=1e-4': index 5 out of range (tasks has 2 items)"),
        (
            "model.name=x",
            "override 'model.name=x': model is not a mapping or list, cannot set 'name' in it",
        ),
        ("tasks.0.lr=[1", None),
    ],
)
def test_bad_overrides(write_spec: WriteSpec, override: str, message: str | None) -> None:
    with pytest.raises(SpecError) as info:
        load_job_spec(write_spec(), [override])
    if message is None:
        assert info.value.errors[0].startswith(f"override {override!r}: value is not valid YAML")
    else:
        assert info.value.errors == [message]


def test_override_errors_and_validation_errors_together(write_spec: WriteSpec) -> None:
    with pytest.raises(SpecError) as info:
        load_job_spec(write_spec(), ["tasks.zz.lr=1", "tasks.0.peft.r=-4", "tasks.qa.btach_size=2"])
    assert info.value.errors == [
        "override 'tasks.zz.lr=1': no task named 'zz' in tasks (names: sentiment, qa)",
        "tasks[0].peft.r: must be a positive integer, got -4",
        "tasks[1].btach_size: unknown key (did you mean 'batch_size'?)",
    ]


def test_override_values_are_validated(write_spec: WriteSpec) -> None:
    with pytest.raises(SpecError) as info:
        load_job_spec(write_spec(), ["tasks.*.steps=0"])
    assert info.value.errors == [
        "tasks[0].steps: must be a positive integer, got 0",
        "tasks[1].steps: must be a positive integer, got 0",
    ]
