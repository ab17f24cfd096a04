"""`report_to: tensorboard`: each task's step metrics also land in TensorBoard event files, equal
to its metrics.jsonl, step for step; a resume after SIGKILL logs no step twice; the spec and plan
field is validated; a missing tensorboard package is refused by muxtune-compile and muxtune-run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter
from user_path import default_tasks, kill_run_when, read_jsonl, run_cli, snapshot, write_job

from muxtune.compiler.cli import main as compile_main
from muxtune.plans import PlanError, load_plan, plan_from_dict, plan_to_dict
from muxtune.runtime import tensorboard_log
from muxtune.runtime.checkpoint import JOB_RECORD, PREVIOUS_JOB_RECORD, read_job_record
from muxtune.runtime.cli import main as run_main
from muxtune.runtime.run_folder import run_record
from muxtune.runtime.tensorboard_log import (
    MISSING_PACKAGE,
    SCALARS,
    TENSORBOARD_DIR,
    TensorBoardLog,
    report_to_problems,
)
from muxtune.specs import SpecError, job_spec_to_dict, parse_job_spec

Scalars = dict[tuple[str, int], list[float]]


def small_tasks() -> list[dict]:
    """Two tasks of the default job, cut short: a checkpoint every round for `qa`."""
    sentiment, qa = default_tasks()[:2]
    return [{**sentiment, "steps": 4, "save_every": 2}, {**qa, "steps": 5, "save_every": 1}]


def compile_job(directory: Path) -> Path:
    """Compile (in this process: torch is loaded already) the small job with ``report_to: tensorboard``."""
    job = write_job(directory, small_tasks(), report_to="tensorboard")
    assert compile_main([str(job), "-o", str(directory / "plan.yaml")]) == 0
    return directory / "plan.yaml"


def event_scalars(folder: Path) -> Scalars:
    """Every scalar in every event file of ``folder``, by (tag, step): a step logged twice shows
    up as two values (TensorBoard's own reader would hide it)."""
    found: Scalars = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for record in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(record)
            for value in event.summary.value:
                found.setdefault((value.tag, event.step), []).append(value.simple_value)
    return found


def expected_scalars(metrics: list[dict]) -> dict[tuple[str, int], float]:
    return {(tag, m["step"]): float(m[key]) for m in metrics for tag, key in SCALARS}


def assert_matches_metrics(task_dir: Path) -> None:
    """The event files hold each metrics.jsonl value once, at its step (float32 precision)."""
    expected = expected_scalars(read_jsonl(task_dir / "metrics.jsonl"))
    found = event_scalars(task_dir / TENSORBOARD_DIR)
    assert sorted(found) == sorted(expected)
    for key, value in expected.items():
        assert found[key] == [pytest.approx(value, rel=1e-6, abs=1e-9)], key


def append_scalar(path: Path, tag: str, step: int, value: float) -> None:
    """Append one scalar event to an event file, as a writer killed before its resume left it."""
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=value)])
    with path.open("ab") as handle:
        RecordWriter(handle).write(Event(step=step, wall_time=1.0, summary=summary).SerializeToString())


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of a two-task job with ``report_to: tensorboard``."""
    directory = tmp_path_factory.mktemp("tensorboard")
    plan = compile_job(directory)
    result = run_cli("run", str(plan))
    assert result.returncode == 0, result.stderr
    return directory


def test_event_files_equal_metrics(finished: Path) -> None:
    for task in small_tasks():
        task_dir = finished / "out" / task["name"]
        assert_matches_metrics(task_dir)
        accumulator = EventAccumulator(str(task_dir / TENSORBOARD_DIR))
        accumulator.Reload()
        assert sorted(accumulator.Tags()["scalars"]) == sorted(tag for tag, _ in SCALARS)
        losses = [(e.step, e.value) for e in accumulator.Scalars("train/loss")]
        metrics = read_jsonl(task_dir / "metrics.jsonl")
        assert losses == [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in metrics]


def test_plan_carries_report_to_and_old_plans_load(finished: Path) -> None:
    plan = load_plan(finished / "plan.yaml")
    assert plan.job.report_to == ("tensorboard",)
    data = plan_to_dict(plan)
    del data["job"]["report_to"]
    assert plan_from_dict(data).job.report_to == ()
    data["job"]["report_to"] = ["wandb"]
    with pytest.raises(PlanError, match=r"job\.report_to: unsupported integration 'wandb'"):
        plan_from_dict(data)


def test_report_to_change_keeps_run_record(finished: Path) -> None:
    plan = load_plan(finished / "plan.yaml")
    without = dataclasses.replace(plan, job=dataclasses.replace(plan.job, report_to=()))
    assert run_record(without) == run_record(plan), "resuming with another report_to is allowed"


def test_resume_after_sigkill_logs_each_step_once(tmp_path: Path) -> None:
    plan = compile_job(tmp_path)
    out = tmp_path / "out"
    kill_run_when(plan, out / PREVIOUS_JOB_RECORD)
    record = read_job_record(out, JOB_RECORD)
    assert record is not None
    for name, entry in record["tasks"].items():
        files = sorted((out / name / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
        assert len(files) == 1, "the killed process wrote one event file per task"
        append_scalar(files[0], "train/loss", entry["step"] + 1, 1e6)
    resumed = run_cli("run", str(plan), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    new_files = 0
    for task in small_tasks():
        task_dir = out / task["name"]
        assert_matches_metrics(task_dir)
        assert [m["step"] for m in read_jsonl(task_dir / "metrics.jsonl")] == list(range(1, task["steps"] + 1))
        new_files += len(list((task_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) - 1
    assert new_files >= 1, "the resumed process writes a new event file"


def test_truncate_after_keeps_earlier_steps_and_drops_empty_files(tmp_path: Path) -> None:
    folder = tmp_path / TENSORBOARD_DIR
    first = TensorBoardLog(folder)
    for step in range(1, 6):
        first.log({"step": step, "loss": float(step), "tokens": 10 * step})
    first.close()
    second = TensorBoardLog(folder)
    second.truncate_after(3)
    assert sorted(event_scalars(folder)) == sorted(
        (tag, step) for step in (1, 2, 3) for tag in ("train/loss", "train/tokens")
    )
    second.log({"step": 4, "loss": 40.0, "tokens": 400})
    second.close()
    assert event_scalars(folder)[("train/loss", 4)] == [40.0]
    assert len(second.event_files()) == 2
    TensorBoardLog(folder).truncate_after(0)
    assert not list(folder.iterdir()), "files left without any scalar are removed"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tensorboard", ("tensorboard",)),
        (["tensorboard"], ("tensorboard",)),
        ("none", ()),
        (["none"], ()),
        ([], ()),
        (None, ()),
    ],
)
def test_report_to_forms(tmp_path: Path, value: object, expected: tuple[str, ...]) -> None:
    raw = {"model": "builtin:tiny-llama", "output_dir": "out", "tasks": small_tasks(), "report_to": value}
    spec = parse_job_spec(raw, tmp_path)
    assert spec.report_to == expected
    assert parse_job_spec(job_spec_to_dict(spec)) == spec
    del raw["report_to"]
    assert parse_job_spec(raw, tmp_path).report_to == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("wandb", "report_to: unsupported integration 'wandb' (supported: none, tensorboard)"),
        (["tensorboard", "wandb"], "report_to: unsupported integration 'wandb' (supported: none, tensorboard)"),
        (["tensorboard", "none"], "report_to: 'none' cannot be listed with other integrations"),
        (["tensorboard", "tensorboard"], "report_to: must not repeat an integration"),
        (3, "report_to: must be 'none', 'tensorboard' or a list of them, got 3"),
    ],
)
def test_bad_report_to_is_refused(tmp_path: Path, value: object, message: str) -> None:
    raw = {"model": "builtin:tiny-llama", "output_dir": "out", "tasks": small_tasks(), "report_to": value}
    with pytest.raises(SpecError) as refused:
        parse_job_spec(raw, tmp_path)
    assert message in str(refused.value)


def test_compile_cli_refuses_unknown_integration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path, small_tasks(), report_to="wandb")
    assert compile_main([str(job), "-o", str(tmp_path / "plan.yaml")]) == 2
    err = capsys.readouterr().err
    assert "report_to: unsupported integration 'wandb' (supported: none, tensorboard)" in err
    assert "Traceback" not in err and not (tmp_path / "plan.yaml").exists()


def test_missing_package_is_refused(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tensorboard_log, "tensorboard_installed", lambda: False)
    job = write_job(tmp_path, small_tasks(), report_to=["tensorboard"])
    assert compile_main([str(job), "-o", str(tmp_path / "plan.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"muxtune-compile: error: {MISSING_PACKAGE}" in err and "Traceback" not in err
    assert MISSING_PACKAGE == "report_to: tensorboard needs the tensorboard package: pip install tensorboard"
    assert not (tmp_path / "plan.yaml").exists()

    before = snapshot(finished / "out")
    assert run_main([str(finished / "plan.yaml")]) == 2
    assert f"muxtune-run: error: {MISSING_PACKAGE}" in capsys.readouterr().err
    assert snapshot(finished / "out") == before
    assert report_to_problems(()) == [], "no package is needed without tensorboard"
