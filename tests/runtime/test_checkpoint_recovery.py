"""Checkpoints that survive corruption: every file is checked before a resume restores it, a
damaged newest round falls back to the round before it with the uninterrupted run's results,
`.partial-*` folders left by a kill are removed, and `save_every: 0` checkpoints at the end."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_run_cli import adapters, compile_and_run
from user_path import default_tasks, kill_run_when, read_jsonl, run_cli, write_job

from muxtune.runtime.checkpoint import (
    CHECKPOINTS,
    JOB_RECORD,
    PREVIOUS_JOB_RECORD,
    CheckpointError,
    read_job_record,
    resume_record,
    verify_checkpoint,
)

NAMES = [task["name"] for task in default_tasks()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of the default job run from start to end."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    result = compile_and_run(directory)
    assert result.returncode == 0, result.stderr
    return directory / "out"


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default job killed (SIGKILL) once it holds two job records; `out.crashed` keeps a copy
    of its output folder as the kill left it."""
    directory = tmp_path_factory.mktemp("crashed")
    job = write_job(directory)
    assert run_cli("compile", str(job), "-o", str(directory / "plan.yaml")).returncode == 0
    kill_run_when(directory / "plan.yaml", directory / "out" / PREVIOUS_JOB_RECORD)
    shutil.copytree(directory / "out", directory / "out.crashed", symlinks=True)
    return directory


def crashed_out(crashed: Path) -> Path:
    """The crashed run's output folder, put back as the kill left it."""
    out = crashed / "out"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(crashed / "out.crashed", out, symlinks=True)
    return out


def newest_only(out: Path) -> tuple[str, Path, int]:
    """A task checkpoint that only the newest job record names, and the previous record's round."""
    newest, previous = read_job_record(out), read_job_record(out, PREVIOUS_JOB_RECORD)
    assert newest is not None and previous is not None
    for name, entry in newest["tasks"].items():
        if entry["checkpoint"] != previous["tasks"][name]["checkpoint"]:
            return name, out / name / CHECKPOINTS / entry["checkpoint"], previous["round"]
    raise AssertionError("the newest job record names no checkpoint of its own")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:120])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x80\xffnot what was saved\x00" * 8)


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in records]


def assert_same_results(expected: Path, got: Path) -> None:
    """Adapters bitwise equal, metrics (but `seconds`) and manifests equal."""
    want, have = adapters(expected, NAMES), adapters(got, NAMES)
    for name in NAMES:
        assert want[name].keys() == have[name].keys()
        for key, value in want[name].items():
            assert torch.equal(have[name][key], value), f"{name}:{key} differs after resume"
        for log in ("metrics.jsonl", "manifest.jsonl"):
            assert without_seconds(read_jsonl(got / name / log)) == without_seconds(read_jsonl(expected / name / log))


@pytest.mark.parametrize(
    ("damaged_file", "damage"),
    [("adapter.safetensors", truncate), ("optimizer.pt", garbage), ("state.json", garbage)],
    ids=["truncated-adapter", "garbage-optimizer", "garbage-state"],
)
def test_damaged_latest_checkpoint_resumes_from_previous_round(
    uninterrupted: Path, crashed: Path, damaged_file: str, damage: Callable[[Path], None]
) -> None:
    out = crashed_out(crashed)
    task, checkpoint, previous_round = newest_only(out)
    damage(checkpoint / damaged_file)
    resumed = run_cli("run", str(crashed / "plan.yaml"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoint {task}/{CHECKPOINTS}/{checkpoint.name}/{damaged_file} is damaged" in resumed.stderr
    assert f"resuming from round {previous_round} instead" in resumed.stderr
    assert_same_results(uninterrupted, out)
    assert resume_record(out)[1] == [], "the finished run's records name only intact checkpoints"


def test_both_generations_damaged_exit_2(crashed: Path) -> None:
    out = crashed_out(crashed)
    task, checkpoint, _ = newest_only(out)
    truncate(checkpoint / "adapter.safetensors")
    previous = read_job_record(out, PREVIOUS_JOB_RECORD)
    assert previous is not None
    older = out / task / CHECKPOINTS / previous["tasks"][task]["checkpoint"]
    garbage(older / "rng.pt")
    resumed = run_cli("run", str(crashed / "plan.yaml"), "--resume")
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr
    assert f"{task}/{CHECKPOINTS}/{checkpoint.name}/adapter.safetensors is damaged" in resumed.stderr
    assert f"{task}/{CHECKPOINTS}/{older.name}/rng.pt is damaged" in resumed.stderr
    assert not (out / "summary.json").exists()


def test_leftover_partial_folder_removed_on_resume(uninterrupted: Path, crashed: Path) -> None:
    out = crashed_out(crashed)
    partial = out / "qa" / CHECKPOINTS / ".partial-xyz"
    partial.mkdir()
    (partial / "adapter.safetensors").write_bytes(b"cut short")
    resumed = run_cli("run", str(crashed / "plan.yaml"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "damaged" not in resumed.stderr
    assert not partial.exists()
    assert_same_results(uninterrupted, out)


def test_save_every_zero_checkpoints_at_the_end(tmp_path: Path) -> None:
    base = default_tasks()
    tasks = [{**base[0], "steps": 2, "save_every": 0}, {**base[1], "steps": 3, "save_every": 0}]
    result = compile_and_run(tmp_path, tasks=tasks)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    record, previous = read_job_record(out), read_job_record(out, PREVIOUS_JOB_RECORD)
    assert record is not None and previous is not None
    assert record["tasks"] == {
        "sentiment": {"step": 2, "status": "finished", "checkpoint": "step-000002"},
        "qa": {"step": 3, "status": "finished", "checkpoint": "step-000003"},
    }
    assert previous["tasks"]["qa"] == {"step": 2, "status": "active", "checkpoint": "step-000002"}
    assert verify_checkpoint(out / "qa" / CHECKPOINTS / "step-000003")["step"] == 3
    assert sorted(p.name for p in (out / "qa" / CHECKPOINTS).iterdir()) == ["step-000002", "step-000003"]
    assert sorted(p.name for p in (out / "sentiment" / CHECKPOINTS).iterdir()) == ["step-000002"]


@pytest.mark.parametrize(
    ("damaged_file", "damage", "reason"),
    [
        ("rng.pt", Path.unlink, "is missing"),
        ("optimizer.pt", flip_one_byte, "sha256"),
        ("adapter.safetensors", truncate, "size 120 bytes"),
        ("state.json", garbage, "not UTF-8"),
        ("state.json", lambda path: path.write_text('{"step": 1'), "not valid JSON"),
        ("state.json", lambda path: path.write_text('{"step": 1, "status": "active"}'), "sha256"),
    ],
    ids=["missing", "altered", "truncated", "not-utf8", "not-json", "wrong-fields"],
)
def test_verify_names_the_damaged_file(
    crashed: Path, damaged_file: str, damage: Callable[[Path], object], reason: str
) -> None:
    out = crashed_out(crashed)
    _, checkpoint, _ = newest_only(out)
    verify_checkpoint(checkpoint)
    damage(checkpoint / damaged_file)
    with pytest.raises(CheckpointError, match=reason) as raised:
        verify_checkpoint(checkpoint, root=out)
    assert f"{checkpoint.relative_to(out)}/{damaged_file}" in str(raised.value)


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe garbage", b'{"round": 3', json.dumps({"round": "three", "tasks": {}}).encode()],
    ids=["not-utf8", "not-json", "wrong-fields"],
)
def test_damaged_job_record_falls_back_to_previous(crashed: Path, content: bytes) -> None:
    out = crashed_out(crashed)
    (out / JOB_RECORD).write_bytes(content)
    with pytest.raises(CheckpointError, match=JOB_RECORD):
        read_job_record(out)
    previous = read_job_record(out, PREVIOUS_JOB_RECORD)
    assert previous is not None
    record, notes = resume_record(out)
    assert record == previous
    assert len(notes) == 1 and JOB_RECORD in notes[0] and f"resuming from round {previous['round']}" in notes[0]
    (out / PREVIOUS_JOB_RECORD).write_bytes(content)
    with pytest.raises(CheckpointError, match=PREVIOUS_JOB_RECORD):
        resume_record(out)
