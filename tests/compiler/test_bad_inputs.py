"""Malformed specs, overrides, data files and plans: exit status 2, a message naming the field
or file (and line), no traceback, and nothing written."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from user_path import default_tasks, run_cli, snapshot, write_job

from muxtune.compiler.cli import main as compile_main
from muxtune.runtime.cli import main as run_main


def set_task(index: int, **fields: object) -> Callable[[dict, Path], None]:
    def mutate(job: dict, _: Path) -> None:
        job["tasks"][index].update(fields)

    return mutate


def set_peft(index: int, **fields: object) -> Callable[[dict, Path], None]:
    def mutate(job: dict, _: Path) -> None:
        job["tasks"][index]["peft"].update(fields)

    return mutate


def data_file(lines: list[str]) -> Callable[[dict, Path], None]:
    def mutate(job: dict, directory: Path) -> None:
        path = directory / "broken.jsonl"
        path.write_text("".join(line + "\n" for line in lines))
        job["tasks"][1]["data"]["path"] = str(path)

    return mutate


def rename_task(job: dict, _: Path) -> None:
    job["tasks"][2]["name"] = job["tasks"][0]["name"]


def model_without_tokenizer(directory: Path) -> Path:
    """A copy of builtin:tiny-llama that lacks its tokenizer.json."""
    from muxtune.runtime.model_sources import resolve_model_dir

    target = directory / "model"
    shutil.copytree(resolve_model_dir("builtin:tiny-llama"), target)
    (target / "tokenizer.json").unlink()
    return target


GOOD = json.dumps({"prompt": "Review: fine\nSentiment:", "completion": " positive"})

SPEC_CASES = {
    "negative rank": (set_peft(1, r=-4), [], ["tasks[1].peft.r: must be a positive integer, got -4"]),
    "unknown key": (set_task(0, btach_size=4), [], ["tasks[0].btach_size", "did you mean 'batch_size'"]),
    "duplicate names": (rename_task, [], ["tasks[2].name", "duplicate"]),
    "unsafe name": (set_task(0, name="../evil"), [], ["tasks[0].name"]),
    "missing data file": (
        lambda job, d: job["tasks"][0]["data"].update(path=str(d / "nope.jsonl")),
        [],
        ["tasks[0].data.path", "nope.jsonl"],
    ),
    "unknown method": (set_peft(0, method="loha"), [], ["tasks[0].peft.method", "lora, ia3"]),
    "bad dtype": (lambda job, d: job.update(dtype="fp8"), [], ["dtype", "fp8"]),
    "bad schedule": (set_task(2, schedule={"name": "exponential"}), [], ["tasks[2].schedule.name"]),
    "several errors at once": (
        lambda job, d: (set_peft(0, r=0)(job, d), set_task(1, lr="fast")(job, d)),
        [],
        ["tasks[0].peft.r", "tasks[1].lr"],
    ),
    "override unknown task": (lambda job, d: None, ["tasks.nope.lr=1e-4"], ["tasks.nope.lr=1e-4", "nope"]),
    "override without '='": (lambda job, d: None, ["dtype"], ["dtype"]),
    "override bad value": (lambda job, d: None, ["tasks.qa.steps=-3"], ["tasks[1].steps"]),
    "bad JSON line": (data_file([GOOD, GOOD, "{not json"]), [], ["broken.jsonl:3", "invalid JSON"]),
    "missing field": (data_file([GOOD, json.dumps({"prompt": "x"})]), [], ["broken.jsonl:2", "'completion'"]),
    "empty dataset": (data_file([]), [], ["broken.jsonl", "empty"]),
    "no target survives truncation": (
        lambda job, d: (
            data_file([json.dumps({"prompt": "word " * 300, "completion": " yes"})])(job, d),
            job["tasks"][1].update(max_seq_len=16),
        ),
        [],
        ["tasks[1].data.path", "max_seq_len=16"],
    ),
    "targets match nothing": (
        set_peft(2, target_modules=["query_key_value"]),
        [],
        ["tasks[2].peft.target_modules", "q_proj"],
    ),
    "init_from without adapter": (
        lambda job, d: (d / "empty_adapter").mkdir() or set_task(0, init_from=str(d / "empty_adapter"))(job, d),
        [],
        ["tasks[0].init_from", "adapter_config.json"],
    ),
    "model without tokenizer": (
        lambda job, d: job.update(model=str(model_without_tokenizer(d))),
        [],
        ["model:", "tokenizer.json", "not found"],
    ),
    "unknown builtin model": (lambda job, d: job.update(model="builtin:gpt-17"), [], ["model", "builtin:gpt-17"]),
    "no streams": (lambda job, d: None, ["--streams", "0"], ["streams: must be a positive integer, got 0"]),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_bad_spec_exits_2_and_writes_nothing(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mutate, overrides, expected = SPEC_CASES[case]
    job = {"model": "builtin:tiny-llama", "output_dir": "out", "tasks": default_tasks()}
    mutate(job, tmp_path)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job, sort_keys=False))
    before = snapshot(tmp_path)
    assert compile_main([str(spec), "-o", str(tmp_path / "plan.yaml"), *overrides]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, f"{text!r} not in: {err}"
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_invalid_yaml_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("model: builtin:tiny-llama\ntasks:\n  - name: [unclosed\n")
    assert compile_main([str(spec), "--validate"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"job\.yaml:\d+:\d+: invalid YAML", err) and "Traceback" not in err


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("compiled")
    spec = write_job(directory)
    assert compile_main([str(spec), "-o", str(directory / "plan.yaml")]) == 0
    return directory


def edit_plan(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


PLAN_CASES = {
    "missing plan file": (None, ["plan.yaml"]),
    "version changed": (lambda t: edit_plan(t, "schema_version: 2", "schema_version: 3"), ["schema_version"]),
    "schema 1 plan": (
        lambda t: edit_plan(t, "schema_version: 2", "schema_version: 1"),
        ["schema_version: this runtime reads plan schema 2, the file has 1; compile the job again"],
    ),
    "step before its micro-batches": (
        lambda t: edit_plan(
            t,
            "  phases:\n  - - {op: load_batches, htask: 0, stream: 0}",
            "  phases:\n  - - {op: optimizer_step, tasks: [qa]}\n    - {op: load_batches, htask: 0, stream: 0}",
        ),
        ["programs[0].phases[0][0]"],
    ),
    "fingerprint changed": (lambda t: edit_plan(t, "fingerprint: ", "fingerprint: 0"), ["fingerprint"]),
    "field removed": (lambda t: edit_plan(t, "  max_grad_norm: 1.0\n", ""), ["max_grad_norm"]),
    "unknown opcode": (lambda t: edit_plan(t, "op: checkpoint", "op: teleport"), ["teleport"]),
    "not YAML": (lambda t: "schema_version: [1\n", ["plan.yaml:2:1: invalid YAML"]),
    "CUDA plan without a GPU": (lambda t: t.replace("device: cpu", "device: cuda"), ["needs a CUDA GPU"]),
}


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_bad_plan_exits_2_and_writes_nothing(
    case: str, compiled: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    edit, expected = PLAN_CASES[case]
    if case == "CUDA plan without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    plan = tmp_path / "plan.yaml"
    if edit is not None:
        plan.write_text(edit((compiled / "plan.yaml").read_text()))
    before = snapshot(compiled)
    assert run_main([str(plan)]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, f"{text!r} not in: {err}"
    assert "Traceback" not in err
    assert snapshot(compiled) == before


def test_data_changed_after_compile_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tasks = default_tasks()
    data = tmp_path / "data.jsonl"
    data.write_text(Path(tasks[0]["data"]["path"]).read_text())
    tasks[0]["data"]["path"] = str(data)
    spec = write_job(tmp_path, tasks)
    assert compile_main([str(spec), "-o", str(tmp_path / "plan.yaml")]) == 0
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:50]))
    assert run_main([str(tmp_path / "plan.yaml")]) == 2
    err = capsys.readouterr().err
    assert "data.jsonl" in err and "changed since the plan was compiled" in err
    assert not (tmp_path / "out").exists()


def test_cli_subprocess_prints_no_traceback(tmp_path: Path) -> None:
    job = {"model": "builtin:tiny-llama", "output_dir": "out", "tasks": default_tasks()}
    job["tasks"][1]["peft"]["r"] = -4
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job))
    result = run_cli("compile", str(spec), "-o", str(tmp_path / "plan.yaml"))
    assert result.returncode == 2
    assert "tasks[1].peft.r: must be a positive integer, got -4" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "plan.yaml").exists()
