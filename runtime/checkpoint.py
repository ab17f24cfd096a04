"""Checkpoints: per task state, plus two generations of job records that tie them to rounds.

Per task, `<task_dir>/checkpoints/step-000010/` holds `adapter.safetensors`, `optimizer.pt`,
`rng.pt` and `state.json`; `state.json` holds the step, the status and the size and sha256 of
each other file, and restoring checks them all before loading anything. The folder is assembled
(and synced) in a hidden `.partial-*` folder and renamed into place, so a crash leaves at worst a
`.partial-*` folder, which the next run removes, never a partial `step-*` folder.

A job record names one round and, per task, its step, status and checkpoint folder:
`{"round": 6, "tasks": {"qa": {"step": 5, "status": "finished", "checkpoint": "step-000005"}}}`.
The job keeps two generations: `<output_dir>/checkpoint.json` (the newest) and
`checkpoint.previous.json` (the record it follows), each a whole file written atomically after
the task checkpoints it names, the newest first (a kill between the two leaves an older previous
record, whose checkpoints are still there). Task checkpoints that neither record names are pruned
only after both are written. Resuming verifies every checkpoint of the newest record before
restoring any, and falls back to the previous record when one is damaged. All tasks are restored
to the same round, so the resumed rounds hold the same tasks as the uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from muxtune.common.errors import UserError
from muxtune.common.files import apply_umask_mode, atomic_write_bytes, make_temp_dir
from muxtune.common.text import quote

from .engine import TaskState, TaskStatus, load_task_state
from .sharding import local_optimizer_state

CHECKPOINTS = "checkpoints"
JOB_RECORD = "checkpoint.json"
PREVIOUS_JOB_RECORD = "checkpoint.previous.json"
STATE_FILE = "state.json"
CHECKED_FILES = ("adapter.safetensors", "optimizer.pt", "rng.pt")
PARTIAL_PREFIX = ".partial-"
STEP_DIR = re.compile(r"^step-(\d{6,})$")
_TASK_NAME = re.compile(r"^[a-z0-9_-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_STATUSES = frozenset(status.value for status in TaskStatus)


class CheckpointError(UserError):
    """A checkpoint or job record that cannot be restored, naming the file."""


def checkpoint_dirs(task_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a task, oldest first."""
    root = task_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(task_dir: Path) -> Path | None:
    """The task's checkpoint of the highest step, if any."""
    found = checkpoint_dirs(task_dir)
    return found[-1][1] if found else None


def file_entry(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, as `state.json` records them."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": size, "sha256": digest.hexdigest()}


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TaskSnapshot:
    """What a task checkpoint holds: the adapter tensors (``<anchor>.<param>``), the optimizer
    state dict, the dropout generator state, the step and the status."""

    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: torch.Tensor
    step: int
    status: TaskStatus


def checkpoint_dir(task_dir: Path, step: int) -> Path:
    """Where a task's checkpoint after ``step`` lives."""
    return task_dir / CHECKPOINTS / f"step-{step:06d}"


def save_checkpoint(task_dir: Path, snapshot: TaskSnapshot) -> Path:
    """Write a task's state after its current step; returns the checkpoint folder."""
    root = task_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(task_dir, snapshot.step)
    tmp = make_temp_dir(root, PARTIAL_PREFIX)
    try:
        save_file({k: v.contiguous() for k, v in snapshot.adapter.items()}, str(tmp / "adapter.safetensors"))
        apply_umask_mode(tmp / "adapter.safetensors")
        torch.save(snapshot.optimizer, tmp / "optimizer.pt")
        torch.save(snapshot.rng, tmp / "rng.pt")
        files = {name: file_entry(tmp / name) for name in CHECKED_FILES}
        info = {"step": snapshot.step, "status": snapshot.status.value, "files": files}
        (tmp / STATE_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name in (*CHECKED_FILES, STATE_FILE):
            _sync(tmp / name)
        _sync(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _sync(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def remove_partial_checkpoints(task_dir: Path) -> None:
    """Remove the `.partial-*` folders a save interrupted by a crash left behind."""
    root = task_dir / CHECKPOINTS
    if not root.is_dir():
        return
    for path in root.iterdir():
        if not path.name.startswith(PARTIAL_PREFIX):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def prune_checkpoints(task_dir: Path, keep: Collection[str]) -> None:
    """Remove the task's checkpoints other than the folders named in `keep`."""
    for _, path in checkpoint_dirs(task_dir):
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def _load_json(path: Path, shown: str) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{shown} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"{shown} cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{shown} is damaged (not UTF-8 text)") from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{shown} is damaged (not valid JSON)") from None


def _expect(ok: bool, shown: str, what: str) -> None:
    if not ok:
        raise CheckpointError(f"{shown} is damaged ({what})")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_status(value: Any) -> bool:
    return isinstance(value, str) and value in _STATUSES


def _check_state(info: Any, shown: str) -> None:
    _expect(isinstance(info, dict), shown, "not a JSON object")
    _expect(_is_count(info.get("step")), shown, f"step {quote(info.get('step'))}")
    _expect(_is_status(info.get("status")), shown, f"status {quote(info.get('status'))}")
    files = info.get("files")
    _expect(isinstance(files, dict), shown, "no size and sha256 of its files")
    for name in CHECKED_FILES:
        entry = files.get(name)
        valid = isinstance(entry, dict) and _is_count(entry.get("size")) and isinstance(entry.get("sha256"), str)
        _expect(valid and bool(_SHA256.match(entry["sha256"])), shown, f"no valid size and sha256 of {name}")


def verify_checkpoint(checkpoint: Path, root: Path | None = None) -> dict[str, Any]:
    """Check a checkpoint folder against its `state.json` and return that state. CheckpointError
    names the first missing, truncated, garbage or altered file (relative to `root` if given)."""

    def shown(name: str) -> str:
        path = checkpoint / name
        return f"checkpoint {path.relative_to(root) if root is not None else path}"

    info = _load_json(checkpoint / STATE_FILE, shown(STATE_FILE))
    _check_state(info, shown(STATE_FILE))
    match = STEP_DIR.match(checkpoint.name)
    in_folder = match is None or int(match.group(1)) == info["step"]
    _expect(in_folder, shown(STATE_FILE), f"step {info['step']} in folder {checkpoint.name}")
    for name in CHECKED_FILES:
        expected, path = info["files"][name], checkpoint / name
        try:
            size = path.stat().st_size
            digest = file_entry(path)["sha256"] if size == expected["size"] else None
        except FileNotFoundError:
            raise CheckpointError(f"{shown(name)} is missing") from None
        except OSError as exc:
            raise CheckpointError(f"{shown(name)} cannot be read ({exc.strerror or type(exc).__name__})") from None
        _expect(size == expected["size"], shown(name), f"size {size} bytes, expected {expected['size']}")
        _expect(digest == expected["sha256"], shown(name), f"its sha256 is not the one in {STATE_FILE}")
    return info


def restore_checkpoint(checkpoint: Path, state: TaskState, root: Path | None = None) -> None:
    """Verify a checkpoint (see `verify_checkpoint`), then load it into a freshly added task of
    the same config and set its step and status."""
    info = verify_checkpoint(checkpoint, root)
    try:
        load_task_state(state.config.name, state.modules, load_file(str(checkpoint / "adapter.safetensors")))
        optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        state.optimizer.load_state_dict(local_optimizer_state(optimizer, state.parameters))
        state.dropout_generator.set_state(torch.load(checkpoint / "rng.pt", weights_only=True))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{checkpoint}: cannot restore checkpoint: {exc}") from None
    state.step = info["step"]
    state.status = TaskStatus(info["status"])


def _record_bytes(record: dict) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def write_job_record(output_dir: Path, round_index: int, tasks: dict[str, dict], previous: dict | None) -> dict:
    """Record the round the job can resume from (per task its step, status and checkpoint name)
    as the newest record, with `previous`, the record it follows, kept as the one before.
    Returns the new record."""
    record = {"round": round_index, "tasks": tasks}
    atomic_write_bytes(output_dir / JOB_RECORD, _record_bytes(record))
    if previous is None:
        (output_dir / PREVIOUS_JOB_RECORD).unlink(missing_ok=True)
    else:
        atomic_write_bytes(output_dir / PREVIOUS_JOB_RECORD, _record_bytes(previous))
    return record


def _check_record(record: Any, shown: str) -> None:
    _expect(isinstance(record, dict), shown, "not a JSON object")
    _expect(_is_count(record.get("round")), shown, f"round {quote(record.get('round'))}")
    tasks = record.get("tasks")
    _expect(isinstance(tasks, dict), shown, "no tasks")
    for name, entry in tasks.items():
        _expect(bool(_TASK_NAME.match(name)), shown, f"task name {quote(name)}")
        _expect(isinstance(entry, dict), shown, f"task {name} is not a JSON object")
        _expect(_is_count(entry.get("step")), shown, f"task {name}: step {quote(entry.get('step'))}")
        _expect(_is_status(entry.get("status")), shown, f"task {name}: status {quote(entry.get('status'))}")
        checkpoint = entry.get("checkpoint", "")
        valid = checkpoint is None or (isinstance(checkpoint, str) and bool(STEP_DIR.match(checkpoint)))
        _expect(valid, shown, f"task {name}: checkpoint {quote(checkpoint)}")


def read_job_record(output_dir: Path, name: str = JOB_RECORD) -> dict | None:
    """A job record (the newest by default), or None when there is none; CheckpointError when
    it is garbage (not UTF-8, not JSON, wrong fields)."""
    path = output_dir / name
    if not path.exists():
        return None
    record = _load_json(path, f"job record {path}")
    _check_record(record, f"job record {path}")
    return record


def job_record_problems(output_dir: Path, record: dict, name: str = JOB_RECORD) -> list[str]:
    """Verify every task checkpoint a job record names, and that each matches the record; one
    line per damaged file (none when the record can be restored)."""
    problems = []
    for task, entry in sorted(record["tasks"].items()):
        diverged = entry["status"] == TaskStatus.DIVERGED.value
        if entry["checkpoint"] is None:
            if not diverged and entry["step"] > 0:
                problems.append(f"job record {output_dir / name} names no checkpoint of task {task}")
            continue
        folder = output_dir / task / CHECKPOINTS / entry["checkpoint"]
        try:
            info = verify_checkpoint(folder, root=output_dir)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if diverged:
            fits = info["step"] < entry["step"]
        else:
            fits = (info["step"], info["status"]) == (entry["step"], entry["status"])
        if not fits:
            problems.append(
                f"checkpoint {folder.relative_to(output_dir) / STATE_FILE} does not match job record "
                f"{output_dir / name} (step {info['step']}, {info['status']}; "
                f"the record says step {entry['step']}, {entry['status']})"
            )
    return problems


def _usable_record(output_dir: Path, name: str) -> tuple[dict | None, list[str]]:
    try:
        record = read_job_record(output_dir, name)
    except CheckpointError as exc:
        return None, [str(exc)]
    if record is None:
        if name == PREVIOUS_JOB_RECORD:
            return None, [f"there is no earlier job record ({PREVIOUS_JOB_RECORD}) to fall back to"]
        return None, [f"job record {output_dir / name} is missing"]
    problems = job_record_problems(output_dir, record, name)
    return (None if problems else record), problems


def resume_record(output_dir: Path) -> tuple[dict | None, list[str]]:
    """The newest job record whose task checkpoints are all intact, with a note for the user when
    it is not the newest one; None when the job never checkpointed. CheckpointError, naming the
    damaged files, when neither record can be used."""
    if not (output_dir / JOB_RECORD).exists() and not (output_dir / PREVIOUS_JOB_RECORD).exists():
        return None, []
    problems: list[str] = []
    for name in (JOB_RECORD, PREVIOUS_JOB_RECORD):
        record, found = _usable_record(output_dir, name)
        if record is not None:
            notes = [f"{'; '.join(problems)}; resuming from round {record['round']} instead"] if problems else []
            return record, notes
        problems += [problem for problem in found if problem not in problems]
    raise CheckpointError(
        f"cannot resume the run in {output_dir}: "
        + "; ".join(problems)
        + "; no intact checkpoint is left, so start the run over in a new output_dir"
    )
