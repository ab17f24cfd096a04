"""Hostile data files (bad bytes, lone surrogates, huge numbers, deep nesting, directories) fail
cleanly through the real CLIs: exit status 2, the file and line named, no traceback, a short
message, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from user_path import default_tasks, snapshot, write_job

from muxtune.compiler.cli import main as compile_main
from muxtune.runtime.cli import main as run_main
from muxtune.runtime.data import DataError, read_jsonl

GOOD = json.dumps({"prompt": "Review: fine\nSentiment:", "completion": " positive"}).encode()
MAX_OUTPUT = 10_000


def depth(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


HOSTILE = {
    "invalid UTF-8": (
        GOOD + b"\n" + b'{"prompt": "caf\xe9 \xff", "completion": " positive"}\n',
        2,
        ["not valid UTF-8", "0xe9"],
    ),
    "lone surrogate": (
        GOOD + b"\n" + GOOD + b"\n" + b'{"prompt": "x\\ud800", "completion": " positive"}\n',
        3,
        ["'prompt'", "lone surrogate", "\\ud800"],
    ),
    "huge integer": (
        GOOD + b"\n" + b'{"prompt": "x", "completion": "y", "n": ' + b"1" * 5000 + b"}\n",
        2,
        ["5000 digits"],
    ),
    "deeply nested JSON": (GOOD + b"\n" + depth(100_000) + b"\n", 2, ["nested too deeply"]),
    "deeply nested field": (
        b'{"prompt": "x", "completion": "y", "extra": ' + depth(100_000) + b"}\n",
        1,
        ["nested too deeply"],
    ),
}


def assert_clean_failure(code: int, err: str, expected: list[str]) -> None:
    assert code == 2, err
    for text in expected:
        assert text in err, f"{text!r} not in: {err}"
    assert "Traceback" not in err
    assert len(err) < MAX_OUTPUT


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_data_file_fails_compile_cleanly(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    content, line, expected = HOSTILE[case]
    data = tmp_path / "hostile.jsonl"
    data.write_bytes(content)
    tasks = default_tasks()[:1]
    tasks[0]["data"]["path"] = str(data)
    spec = write_job(tmp_path, tasks)
    before = snapshot(tmp_path)
    code = compile_main([str(spec), "-o", str(tmp_path / "plan.yaml")])
    captured = capsys.readouterr()
    assert_clean_failure(code, captured.out + captured.err, [f"tasks[0].data.path: {data}:{line}: ", *expected])
    assert not (tmp_path / "plan.yaml").exists()
    assert snapshot(tmp_path) == before


def test_data_path_that_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    tasks = default_tasks()[:1]
    tasks[0]["data"]["path"] = str(folder)
    spec = write_job(tmp_path, tasks)
    before = snapshot(tmp_path)
    code = compile_main([str(spec), "-o", str(tmp_path / "plan.yaml")])
    captured = capsys.readouterr()
    assert_clean_failure(
        code, captured.out + captured.err, [f"tasks[0].data.path: is a directory, not a file: {folder}"]
    )
    assert not (tmp_path / "plan.yaml").exists()
    assert snapshot(tmp_path) == before
    with pytest.raises(DataError, match="is a directory"):
        read_jsonl(folder, "prompt_completion")


@pytest.mark.parametrize("hostile", ["invalid UTF-8", "directory"])
def test_data_turned_hostile_after_compile_fails_run_cleanly(
    hostile: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_bytes(GOOD + b"\n" + GOOD + b"\n")
    tasks = default_tasks()[:1]
    tasks[0]["data"]["path"] = str(data)
    spec = write_job(tmp_path, tasks)
    assert compile_main([str(spec), "-o", str(tmp_path / "plan.yaml")]) == 0
    capsys.readouterr()
    if hostile == "directory":
        data.unlink()
        data.mkdir()
    else:
        data.write_bytes(GOOD + b"\n" + b"\xc3\x28\n")
    code = run_main([str(tmp_path / "plan.yaml")])
    captured = capsys.readouterr()
    assert_clean_failure(code, captured.out + captured.err, [str(data)])
    assert not (tmp_path / "out").exists()


def test_line_endings_still_split_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    for ending in (b"\n", b"\r\n", b"\r"):
        path.write_bytes(GOOD + ending + GOOD + ending)
        assert len(read_jsonl(path, "prompt_completion")) == 2
    path.write_bytes(GOOD + b"\r\n\r\n" + GOOD + b"\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: empty line"):
        read_jsonl(path, "prompt_completion")
