"""Every validation rule, with the exact field path, and all errors at once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from node_paths import corrupted, node_paths
from spec_helpers import base_spec

from muxtune.specs import SpecError, job_spec_to_dict, load_job_spec, parse_job_spec


@pytest.fixture
def errors_for(job_dir: Path) -> Callable[[Callable[[dict[str, Any]], None]], list[str]]:
    """Apply an edit to the base spec and return the errors it causes."""

    def run(edit: Callable[[dict[str, Any]], None]) -> list[str]:
        raw = base_spec()
        edit(raw)
        with pytest.raises(SpecError) as info:
            parse_job_spec(raw, job_dir)
        assert str(info.value) == "\n".join(info.value.errors)
        return info.value.errors

    return run


def _task(index: int, **fields: Any) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        raw["tasks"][index].update(fields)

    return edit


def _peft(index: int, **fields: Any) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        raw["tasks"][index].setdefault("peft", {}).update(fields)

    return edit


def test_valid_base_spec(job_dir: Path) -> None:
    assert len(parse_job_spec(base_spec(), job_dir).tasks) == 2


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_peft(1, r=-4), "tasks[1].peft.r: must be a positive integer, got -4"),
        (_peft(0, r=True), "tasks[0].peft.r: must be a positive integer, got True"),
        (_peft(0, r=8.0), "tasks[0].peft.r: must be a positive integer, got 8.0"),
        (_peft(0, alpha=0), "tasks[0].peft.alpha: must be a positive number, got 0"),
        (_peft(0, dropout=1.0), "tasks[0].peft.dropout: must be a number in [0, 1), got 1.0"),
        (_peft(0, dropout=-0.1), "tasks[0].peft.dropout: must be a number in [0, 1), got -0.1"),
        (
            _peft(0, target_modules=[]),
            "tasks[0].peft.target_modules: must be a non-empty list of module names, got []",
        ),
        (
            _peft(0, target_modules="q_proj"),
            "tasks[0].peft.target_modules: must be a non-empty list of module names, got 'q_proj'",
        ),
        (
            _peft(0, target_modules=["q_proj", "1x"]),
            "tasks[0].peft.target_modules: must contain identifier-like module names, got '1x'",
        ),
        (_peft(0, use_rslora="yes"), "tasks[0].peft.use_rslora: must be true or false, got 'yes'"),
        (
            _peft(0, method="loha"),
            "tasks[0].peft.method: unsupported PEFT method 'loha' (supported: lora, ia3, prefix_tuning, "
            "prompt_tuning, adapter, bias) (did you mean 'lora'?)",
        ),
        (_task(0, lr="abc"), "tasks[0].lr: must be a positive number, got 'abc'"),
        (_task(0, lr=0), "tasks[0].lr: must be a positive number, got 0"),
        (_task(0, lr=True), "tasks[0].lr: must be a positive number, got True"),
        (_task(0, lr=float("inf")), "tasks[0].lr: must be a positive number, got inf"),
        (_task(1, batch_size=0), "tasks[1].batch_size: must be a positive integer, got 0"),
        (_task(1, steps=2.5), "tasks[1].steps: must be a positive integer, got 2.5"),
        (_task(1, max_seq_len=False), "tasks[1].max_seq_len: must be a positive integer, got False"),
        (_task(1, weight_decay=-1), "tasks[1].weight_decay: must be a non-negative number, got -1"),
        (_task(1, max_grad_norm=0), "tasks[1].max_grad_norm: must be a positive number, got 0"),
        (_task(1, save_every=-1), "tasks[1].save_every: must be a non-negative integer, got -1"),
        (_task(1, seed="s"), "tasks[1].seed: must be a non-negative integer, got 's'"),
        (
            _task(1, schedule={"name": "cosine", "warmup_steps": -1}),
            "tasks[1].schedule.warmup_steps: must be a non-negative integer, got -1",
        ),
        (
            _task(1, schedule={"name": "cosine", "warmup_steps": 60}),
            "tasks[1].schedule.warmup_steps: must be <= steps (50), got 60",
        ),
        (
            _task(1, schedule={"name": "step"}),
            "tasks[1].schedule.name: must be one of 'constant', 'linear', 'cosine', got 'step'",
        ),
        (
            _task(1, data={"path": "data/qa.jsonl", "format": "chat"}),
            "tasks[1].data.format: must be one of 'text', 'prompt_completion', got 'chat'",
        ),
        (_task(1, data={"format": "text"}), "tasks[1].data.path: missing required key"),
        (_task(1, data="data/qa.jsonl"), "tasks[1].data: must be a mapping, got 'data/qa.jsonl'"),
        (_task(1, name="QA"), "tasks[1].name: must match [a-z0-9_-]{1,64}, got 'QA'"),
        (_task(1, name="../x"), "tasks[1].name: must match [a-z0-9_-]{1,64}, got '../x'"),
        (_task(1, name="a/b"), "tasks[1].name: must match [a-z0-9_-]{1,64}, got 'a/b'"),
        (_task(1, name=""), "tasks[1].name: must match [a-z0-9_-]{1,64}, got ''"),
        (_task(1, name="sentiment"), "tasks[1].name: duplicate task name 'sentiment' (also tasks[0])"),
        (_task(1, btach_size=4), "tasks[1].btach_size: unknown key (did you mean 'batch_size'?)"),
        (_task(1, colour=4), "tasks[1].colour: unknown key"),
        (_peft(0, rank=4), "tasks[0].peft.rank: unknown key"),
        (_peft(0, alpah=4), "tasks[0].peft.alpah: unknown key (did you mean 'alpha'?)"),
        (
            lambda raw: raw.update(dtype="fp64"),
            "dtype: must be one of 'fp32', 'bf16', 'fp16', got 'fp64' (did you mean 'fp16'?)",
        ),
        (lambda raw: raw.update(modle="x"), "modle: unknown key (did you mean 'model'?)"),
        (lambda raw: raw.pop("model"), "model: missing required key"),
        (lambda raw: raw.update(model=""), "model: must be a non-empty string, got ''"),
        (
            lambda raw: raw.update(model="builtin:"),
            "model: a builtin model needs a name after 'builtin:'",
        ),
        (lambda raw: raw.pop("output_dir"), "output_dir: missing required key"),
        (lambda raw: raw.pop("tasks"), "tasks: missing required key"),
        (lambda raw: raw.update(tasks=[]), "tasks: at least one task is required"),
        (lambda raw: raw.update(tasks={"a": 1}), "tasks: must be a list of task mappings, got {'a': 1}"),
        (lambda raw: raw["tasks"].append("x"), "tasks[2]: must be a task mapping, got 'x'"),
        (
            lambda raw: raw.update(cluster={"device": "mi300x"}),
            "cluster.device: must be one of 'auto', 'cpu', 'cuda', 'a40', 'a100', 'h100', 'h200', got 'mi300x'",
        ),
        (
            lambda raw: raw.update(cluster={"num_devices": 0}),
            "cluster.num_devices: must be a positive integer, got 0",
        ),
        (
            lambda raw: raw.update(cluster={"memory_gb": "lots"}),
            "cluster.memory_gb: must be 'auto' or a positive number, got 'lots'",
        ),
        (
            lambda raw: raw.update(cluster={"pipeline_parallel": 0}),
            "cluster.pipeline_parallel: must be 'auto' or a positive integer, got 0",
        ),
        (
            lambda raw: raw.update(cluster={"tensor_parallel": "two"}),
            "cluster.tensor_parallel: must be 'auto' or a positive integer, got 'two'",
        ),
        (
            lambda raw: raw.update(cluster={"num_devices": 2, "pipeline_parallel": 4}),
            "cluster: pipeline_parallel x tensor_parallel (4) must divide num_devices (2)",
        ),
        (
            lambda raw: raw.update(cluster={"num_devices": 4, "pipeline_parallel": 2, "tensor_parallel": 3}),
            "cluster: pipeline_parallel x tensor_parallel (6) must divide num_devices (4)",
        ),
        (lambda raw: raw.update(cluster="cpu"), "cluster: must be a mapping, got 'cpu'"),
    ],
)
def test_rule(errors_for: Callable[..., list[str]], edit: Callable[[dict[str, Any]], None], message: str) -> None:
    assert errors_for(edit) == [message]


def test_data_path_must_exist_as_a_file(errors_for: Callable[..., list[str]], job_dir: Path) -> None:
    errors = errors_for(_task(0, data={"path": "data/nope.jsonl", "format": "text"}))
    assert errors == [f"tasks[0].data.path: file not found: {job_dir / 'data' / 'nope.jsonl'}"]
    errors = errors_for(_task(0, data={"path": "data", "format": "text"}))
    assert errors == [f"tasks[0].data.path: is a directory, not a file: {job_dir / 'data'}"]


def test_init_from_must_be_a_directory(errors_for: Callable[..., list[str]], job_dir: Path) -> None:
    errors = errors_for(_task(1, init_from="adapters/none"))
    assert errors == [f"tasks[1].init_from: directory not found: {job_dir / 'adapters' / 'none'}"]
    errors = errors_for(_task(1, init_from="data/qa.jsonl"))
    assert errors == [f"tasks[1].init_from: directory not found: {job_dir / 'data' / 'qa.jsonl'}"]


def test_numeric_strings_are_numbers(job_dir: Path) -> None:
    raw = base_spec()
    raw["tasks"][0].update(lr="1e-4", weight_decay="1E-2")
    raw["cluster"] = {"memory_gb": "80"}
    spec = parse_job_spec(raw, job_dir)
    assert spec.tasks[0].lr == 1e-4 and spec.tasks[0].weight_decay == 0.01
    assert spec.cluster.memory_gb == 80.0


def test_yaml_exponent_without_dot_is_a_number(job_dir: Path) -> None:
    (job_dir / "job.yaml").write_text(
        "model: builtin:x\noutput_dir: out\ntasks:\n"
        "  - name: a\n    lr: 1e-4\n    data: {path: data/qa.jsonl, format: text}\n"
    )
    assert load_job_spec(job_dir / "job.yaml").tasks[0].lr == 1e-4


def test_all_errors_are_collected(errors_for: Callable[..., list[str]], job_dir: Path) -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["dtype"] = "int8"
        raw["tasks"][0]["peft"]["r"] = -4
        raw["tasks"][0]["lr"] = "abc"
        raw["tasks"][0]["data"]["path"] = "missing.jsonl"
        raw["tasks"][1]["btach_size"] = 3
        raw["tasks"][1]["name"] = "sentiment"
        raw["cluster"] = {"num_devices": -1}

    errors = errors_for(edit)
    assert set(errors) == {
        "dtype: must be one of 'fp32', 'bf16', 'fp16', got 'int8'",
        "tasks[0].peft.r: must be a positive integer, got -4",
        "tasks[0].lr: must be a positive number, got 'abc'",
        f"tasks[0].data.path: file not found: {job_dir / 'missing.jsonl'}",
        "tasks[1].btach_size: unknown key (did you mean 'batch_size'?)",
        "tasks[1].name: duplicate task name 'sentiment' (also tasks[0])",
        "cluster.num_devices: must be a positive integer, got -1",
    }


def test_absolute_paths_are_kept(job_dir: Path) -> None:
    raw = base_spec()
    raw["tasks"][0]["data"]["path"] = str(job_dir / "data" / "sentiment.jsonl")
    raw["tasks"][1]["data"]["path"] = str(job_dir / "data" / "qa.jsonl")
    raw["output_dir"] = "/abs/out"
    spec = parse_job_spec(raw, Path("/somewhere/else"))
    assert spec.output_dir == "/abs/out"
    assert spec.tasks[1].data.path == str(job_dir / "data" / "qa.jsonl")


def test_null_optional_sections_mean_defaults(job_dir: Path) -> None:
    raw = base_spec()
    raw["cluster"] = None
    raw["tasks"][1].update(peft=None, schedule=None)
    spec = parse_job_spec(raw, job_dir)
    assert spec.cluster.device == "auto"
    assert spec.tasks[1].peft.r == 8 and spec.tasks[1].schedule.name == "constant"


def test_null_data_is_an_error(errors_for: Callable[..., list[str]]) -> None:
    assert errors_for(_task(1, data=None)) == ["tasks[1].data: must be a mapping, got None"]


@pytest.mark.parametrize("junk", [None, "x", -1, 2.5, True, [], {}, "<delete>"])
def test_any_corruption_gives_a_spec_error_or_a_clean_spec(job_dir: Path, junk: Any) -> None:
    """Replacing or deleting any node never crashes and never leaks a placeholder value."""
    for path in node_paths(base_spec()):
        raw = corrupted(base_spec(), path, junk, delete=junk == "<delete>")
        try:
            spec = parse_job_spec(raw, job_dir)
        except SpecError as exc:
            assert exc.errors and "INVALID" not in str(exc) and "MISSING" not in str(exc), (
                path,
                str(exc),
            )
        else:
            assert parse_job_spec(job_spec_to_dict(spec)) == spec, path
