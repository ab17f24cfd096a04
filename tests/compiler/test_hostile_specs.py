"""Hostile specs and plans: alias bombs, duplicate keys, deep nesting, huge values and numbers,
and file-system trouble all end in exit status 2, a bounded message naming the field or file,
no traceback, and nothing written."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml
from user_path import default_tasks, run_cli, snapshot, write_job

from muxtune.compiler.cli import main as compile_main
from muxtune.runtime.cli import main as run_main

MAX_OUTPUT = 10_000

ALIAS_BOMB = "".join(
    [
        'x0: &x0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n',
        *(f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 9)}]\n" for i in range(1, 10)),
    ]
)


def spec_text(tmp_path: Path, **fields: object) -> str:
    job = {"model": "builtin:tiny-llama", "output_dir": "out", "tasks": default_tasks(), **fields}
    return yaml.safe_dump(job, sort_keys=False)


def compile_fails(tmp_path: Path, text: str, capsys: pytest.CaptureFixture, *overrides: str) -> str:
    """Compile ``text`` as a spec; assert exit 2, bounded output, no traceback, nothing written."""
    spec = tmp_path / "job.yaml"
    spec.write_text(text)
    before = snapshot(tmp_path)
    assert compile_main([str(spec), "-o", str(tmp_path / "plan.yaml"), *overrides]) == 2
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert len(output) < MAX_OUTPUT, f"{len(output)} characters of output"
    assert "Traceback" not in output
    assert snapshot(tmp_path) == before
    return captured.err


def test_alias_bomb_spec_is_refused_fast(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    started = time.perf_counter()
    err = compile_fails(tmp_path, ALIAS_BOMB + spec_text(tmp_path), capsys)
    assert time.perf_counter() - started < 1.0
    assert "job.yaml:1:1" in err and "aliases expand" in err


def test_alias_bomb_in_an_override(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    levels = ["&l0 [" + ", ".join(["1"] * 10) + "]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 7)]
    err = compile_fails(tmp_path, spec_text(tmp_path), capsys, f"tasks.0.lr=[{', '.join(levels)}]")
    assert "override 'tasks.0.lr=" in err and "aliases expand" in err


def test_huge_value_is_quoted_briefly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = compile_fails(tmp_path, spec_text(tmp_path, dtype="x" * 1_000_000), capsys)
    assert "dtype" in err and "str of 1000000 characters" in err
    tasks = default_tasks()
    tasks[0]["peft"]["target_modules"] = ["q_proj"] * 100_000
    err = compile_fails(tmp_path, spec_text(tmp_path, tasks=tasks), capsys)
    assert "tasks[0].peft.target_modules" in err and "100000 items" in err


def test_many_errors_are_capped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tasks = [{**default_tasks()[0], "name": f"t{i}", "lr": -1} for i in range(5000)]
    err = compile_fails(tmp_path, spec_text(tmp_path, tasks=tasks), capsys)
    assert "5000 errors" in err and "more" in err


def test_deeply_nested_spec(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = compile_fails(tmp_path, "model: " + "[" * 100_000 + "]" * 100_000 + "\n", capsys)
    assert "job.yaml:1" in err and "nested more than" in err


@pytest.mark.parametrize(
    "value, message",
    [
        ("1" * 5000, "job.yaml:{line}:10: unreadable value"),
        ("2001-13-45", "job.yaml:{line}:10: unreadable value"),
        ("0x" + "f" * 5000, "tasks[0].steps: must be at most 2147483647, got an integer of about 6020 digits"),
    ],
)
def test_unreadable_scalars(value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = spec_text(tmp_path).replace("steps: 6\n", f"steps: {value}\n", 1)
    line = text.splitlines().index(f"  steps: {value}") + 1
    assert message.format(line=line) in compile_fails(tmp_path, text, capsys)


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = spec_text(tmp_path).replace("steps: 6\n", "steps: 6\n  steps: 60\n", 1)
    first = text.splitlines().index("  steps: 6") + 1
    err = compile_fails(tmp_path, text, capsys)
    assert f"job.yaml:{first + 1}: duplicate key 'steps' (first on line {first})" in err


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    text = spec_text(tmp_path)
    merged = text.replace("  max_seq_len: 200\n", "  <<: {max_seq_len: 64, steps: 2}\n  max_seq_len: 200\n", 1)
    assert merged != text
    spec = tmp_path / "job.yaml"
    spec.write_text(merged)
    assert compile_main([str(spec), "--validate"]) == 0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("alpha", 10**400, "tasks[0].peft.alpha: must be a positive number, got an integer of about 400 digits"),
        ("lr", 10**400, "tasks[0].lr: must be a positive number"),
        ("lr", "1e999", "tasks[0].lr: must be a positive number"),
        ("seed", 10**30, "tasks[0].seed: must be at most 9223372036854775807 (a 64-bit seed)"),
        ("batch_size", 10**12, "tasks[0].batch_size: must be at most 65536 (sequences per optimizer step)"),
        ("max_seq_len", 10**9, "tasks[0].max_seq_len: must be at most 1048576"),
        ("steps", 10**20, "tasks[0].steps: must be at most 2147483647"),
        ("r", 10**6, "tasks[0].peft.r: must be at most 65536"),
        ("name", "a" * 300, "tasks[0].name: must match [a-z0-9_-]{1,64}"),
    ],
)
def test_absurd_numbers_are_refused_at_compile_time(
    field: str, value: object, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tasks = default_tasks()
    target = tasks[0]["peft"] if field in ("alpha", "r") else tasks[0]
    target[field] = value
    started = time.perf_counter()
    err = compile_fails(tmp_path, spec_text(tmp_path, tasks=tasks), capsys)
    assert message in err
    assert time.perf_counter() - started < 5.0


def test_plan_alias_bomb_and_duplicate_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = write_job(tmp_path)
    assert compile_main([str(spec), "-o", str(tmp_path / "plan.yaml")]) == 0
    capsys.readouterr()
    plan = tmp_path / "plan.yaml"
    good = plan.read_text()
    cases = {
        "aliases expand": good.replace("backbone:\n", ALIAS_BOMB.replace("x", "y") + "backbone:\n", 1),
        "duplicate key 'fingerprint'": good.replace("fingerprint:", "fingerprint: x\nfingerprint:", 1),
        "nested more than": good.replace("backbone:\n", "deep: " + "[" * 50_000 + "]" * 50_000 + "\nbackbone:\n"),
    }
    for message, text in cases.items():
        plan.write_text(text)
        started = time.perf_counter()
        assert run_main([str(plan)]) == 2
        assert time.perf_counter() - started < 1.0
        captured = capsys.readouterr()
        assert message in captured.err and "plan.yaml:" in captured.err
        assert len(captured.err + captured.out) < MAX_OUTPUT and "Traceback" not in captured.err
        assert not (tmp_path / "out").exists()


def test_plan_path_that_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_main([str(tmp_path)]) == 2
    assert f"{tmp_path}: is a directory, not a file" in capsys.readouterr().err
    spec = write_job(tmp_path)
    (tmp_path / "plan_dir").mkdir()
    assert compile_main([str(spec), "-o", str(tmp_path / "plan_dir")]) == 2
    err = capsys.readouterr().err
    assert "plan_dir: is a directory" in err and "Traceback" not in err
    assert list((tmp_path / "plan_dir").iterdir()) == [] and not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_output_folder_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "blocker").write_text("not a folder\n")
    spec = write_job(tmp_path, output_dir="blocker/out")
    assert compile_main([str(spec), "-o", str(tmp_path / "plan.yaml")]) == 0
    capsys.readouterr()
    assert run_main([str(tmp_path / "plan.yaml")]) == 2
    err = capsys.readouterr().err
    assert "blocker" in err and "Traceback" not in err
    assert (tmp_path / "blocker").read_text() == "not a folder\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied_on_output_folder_and_plan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = write_job(tmp_path, output_dir="locked/out")
    (tmp_path / "locked").mkdir(mode=0o500)
    assert compile_main([str(spec), "-o", str(tmp_path / "plan.yaml")]) == 0
    capsys.readouterr()
    assert run_main([str(tmp_path / "plan.yaml")]) == 2
    assert "locked" in capsys.readouterr().err
    assert compile_main([str(spec), "-o", str(tmp_path / "locked" / "plan.yaml")]) == 2
    assert "permission denied" in capsys.readouterr().err
    (tmp_path / "plan.yaml").chmod(0)
    assert run_main([str(tmp_path / "plan.yaml")]) == 2
    assert "plan.yaml: cannot read: permission denied" in capsys.readouterr().err.lower()


def test_subprocess_alias_bomb_output_is_small(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(ALIAS_BOMB + spec_text(tmp_path))
    result = run_cli("compile", str(spec), "-o", str(tmp_path / "plan.yaml"))
    assert result.returncode == 2 and "aliases expand" in result.stderr
    assert len(result.stdout + result.stderr) < MAX_OUTPUT and "Traceback" not in result.stderr
