"""The output folder: one run at a time, resume only with the same plan and data, never a
write over the user's own files, modes from the umask, and a crashed start that does not block
the next attempt."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from user_path import default_tasks, kill_run_when, read_jsonl, run_cli, snapshot, write_job

from muxtune.runtime.checkpoint import JOB_RECORD
from muxtune.runtime.run_folder import LOCK_FILE, RUN_RECORD


def small_tasks(**changes: object) -> list[dict]:
    """One short task (fast enough for several runs per test)."""
    return [{**default_tasks()[0], "steps": 4, "save_every": 1, **changes}]


def compile_plan(directory: Path, *overrides: str, tasks: list[dict] | None = None, name: str = "plan.yaml") -> Path:
    job = write_job(directory, tasks if tasks is not None else small_tasks())
    result = run_cli("compile", str(job), "-o", str(directory / name), *overrides)
    assert result.returncode == 0, result.stderr
    return directory / name


def start_run(plan: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "muxtune.runtime.cli", str(plan), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_after_first_checkpoint(plan: Path, out: Path) -> None:
    kill_run_when(plan, out / JOB_RECORD)


def without_seconds(path: Path) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in read_jsonl(path)]


@pytest.fixture(scope="module")
def lone_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lone")
    result = run_cli("run", str(compile_plan(directory)))
    assert result.returncode == 0, result.stderr
    return directory / "out"


def test_two_runs_on_one_folder(lone_run: Path, tmp_path: Path) -> None:
    plan = compile_plan(tmp_path)
    first, second = start_run(plan), start_run(plan)
    outcomes = [(p.wait(timeout=600), p.communicate()[1]) for p in (first, second)]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    refused = next(err for code, err in outcomes if code == 2)
    assert "in use by another muxtune-run" in refused or "already holds" in refused
    assert "Traceback" not in refused
    for name in ("metrics.jsonl", "manifest.jsonl"):
        assert without_seconds(tmp_path / "out" / "sentiment" / name) == without_seconds(lone_run / "sentiment" / name)


def test_busy_folder_is_refused_at_once(tmp_path: Path) -> None:
    import fcntl

    plan = compile_plan(tmp_path)
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / LOCK_FILE, "w") as handle:
        handle.write("pid 4242\n")
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_EX)
        started = time.monotonic()
        result = run_cli("run", str(plan))
        assert time.monotonic() - started < 60
    assert result.returncode == 2 and "in use by another muxtune-run (pid 4242)" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LOCK_FILE]


def test_folder_another_run_is_setting_up_is_in_use(tmp_path: Path) -> None:
    """Another run holds the lock and has made its first files but not its run record yet: the
    folder is in use, not a foreign one."""
    import fcntl

    plan = compile_plan(tmp_path)
    (tmp_path / "out" / "sentiment").mkdir(parents=True)
    with open(tmp_path / "out" / LOCK_FILE, "w") as handle:
        handle.write("pid 4242\n")
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_EX)
        result = run_cli("run", str(plan))
    assert result.returncode == 2 and "in use by another muxtune-run (pid 4242)" in result.stderr, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([LOCK_FILE, "sentiment"])


def test_stale_lock_file_does_not_block(tmp_path: Path) -> None:
    plan = compile_plan(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LOCK_FILE).write_text("pid 999999\n")
    result = run_cli("run", str(plan))
    assert result.returncode == 0, result.stderr


def test_resume_with_another_plan_is_refused(tmp_path: Path) -> None:
    plan = compile_plan(tmp_path)
    kill_after_first_checkpoint(plan, tmp_path / "out")
    before = snapshot(tmp_path / "out")
    changes = {
        "lr": ("tasks.sentiment.lr=1e-3", "plan.tasks[0].lr: 0.002 in the run in this folder, 0.001 in this plan"),
        "batch size": ("tasks.sentiment.batch_size=3", "plan.tasks[0].batch_size: 4"),
        "steps": ("tasks.sentiment.steps=5", "plan.tasks[0].steps: 4"),
        "seed": ("tasks.sentiment.seed=7", "plan.tasks[0].seed: 0"),
        "dtype": ("dtype=bf16", "plan.job.dtype: 'fp32'"),
    }
    for override, message in changes.values():
        other = compile_plan(tmp_path, override, name="other.yaml")
        result = run_cli("run", str(other), "--resume")
        assert result.returncode == 2, result.stderr
        assert "made from a different plan or data" in result.stderr and message in result.stderr
        assert snapshot(tmp_path / "out") == before
    resumed = run_cli("run", str(plan), "--resume")
    assert resumed.returncode == 0, resumed.stderr


def test_resume_after_the_data_changed_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    lines = Path(default_tasks()[0]["data"]["path"]).read_text().splitlines(keepends=True)
    data.write_text("".join(lines))
    plan = compile_plan(tmp_path, tasks=small_tasks(data={"path": str(data), "format": "prompt_completion"}))
    kill_after_first_checkpoint(plan, tmp_path / "out")
    data.write_text("".join(lines[1:] + lines[:1]))
    result = run_cli("run", str(plan), "--resume")
    assert result.returncode == 2 and "data_sha256.sentiment" in result.stderr


def test_foreign_files_are_never_written_over(tmp_path: Path) -> None:
    plan = compile_plan(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    (out / "sentiment").mkdir()
    (out / "sentiment" / "metrics.jsonl").write_text("my own metrics\n")
    before = snapshot(out)
    for args in ((), ("--resume",)):
        result = run_cli("run", str(plan), *args)
        assert result.returncode == 2 and "notes.txt" in result.stderr and "Traceback" not in result.stderr
        assert snapshot(out) == before
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sentiment"]


def test_deleted_run_record_keeps_the_checkpoints(tmp_path: Path) -> None:
    plan = compile_plan(tmp_path)
    assert run_cli("run", str(plan)).returncode == 0
    (tmp_path / "out" / RUN_RECORD).unlink()
    before = snapshot(tmp_path / "out")
    result = run_cli("run", str(plan))
    assert result.returncode == 2 and "no run.json of a MuxTune run" in result.stderr
    assert snapshot(tmp_path / "out") == before


def test_symlinked_task_folder_is_not_followed(tmp_path: Path) -> None:
    plan = compile_plan(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    kill_after_first_checkpoint(plan, out)
    task_dir = out / "sentiment"
    task_dir.rename(elsewhere / "sentiment")
    task_dir.symlink_to(elsewhere / "sentiment")
    before = snapshot(elsewhere)
    result = run_cli("run", str(plan), "--resume")
    assert result.returncode == 2 and "symbolic link" in result.stderr
    assert snapshot(elsewhere) == before


def test_crash_after_the_run_record_does_not_block(tmp_path: Path) -> None:
    plan = compile_plan(tmp_path, tasks=small_tasks(save_every=0, steps=2))
    out = tmp_path / "out"
    kill_run_when(plan, out / RUN_RECORD)
    assert not (out / JOB_RECORD).exists()
    result = run_cli("run", str(plan))
    assert result.returncode == 0, result.stderr
    assert "starting over" in result.stderr
    assert [m["step"] for m in read_jsonl(out / "sentiment" / "metrics.jsonl")] == [1, 2]


def test_outputs_follow_the_umask(lone_run: Path, tmp_path: Path) -> None:
    files = [p for p in lone_run.rglob("*") if p.is_file() and p.name != LOCK_FILE]
    assert any(p.name == "adapter_model.safetensors" for p in files)
    umask = os.umask(0o022)
    os.umask(umask)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    for path in [p for p in lone_run.rglob("*") if p.is_dir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask, path
