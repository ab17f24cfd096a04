"""Checkpoints: per task state plus a job record that ties them to one round.

Per task, `<task_dir>/checkpoints/step-000010/` holds `adapter.safetensors`, `optimizer.pt`,
`rng.pt` and `state.json`; it is assembled in a hidden temporary folder and renamed into place,
so a crash never leaves a partial `step-*` folder. The job record `<output_dir>/checkpoint.json`
names, for one round, every task's step, status and checkpoint; it is written (atomically) after
the task checkpoints, and older task checkpoints are pruned only after it. Resuming restores all
tasks to that same round, so the resumed rounds hold the same tasks as the uninterrupted run's.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .adapters import atomic_write_bytes
from .engine import TaskState, TaskStatus, load_task_state

CHECKPOINTS = "checkpoints"
JOB_RECORD = "checkpoint.json"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be restored, naming the file."""


def checkpoint_dirs(task_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a task, oldest first."""
    root = task_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(task_dir: Path) -> Path | None:
    found = checkpoint_dirs(task_dir)
    return found[-1][1] if found else None


def write_job_record(output_dir: Path, round_index: int, tasks: dict[str, dict]) -> None:
    """Record the round the job can resume from: per task its step, status and checkpoint."""
    text = json.dumps({"round": round_index, "tasks": tasks}, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(output_dir / JOB_RECORD, text.encode())


def read_job_record(output_dir: Path) -> dict | None:
    """The last job record, or None when the job never checkpointed."""
    path = output_dir / JOB_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        int(record["round"])
        for task in record["tasks"].values():
            int(task["step"]), TaskStatus(task["status"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a valid checkpoint record: {exc}") from None
    return record


def save_checkpoint(task_dir: Path, state: TaskState) -> Path:
    """Write the task's state after its current step."""
    root = task_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
    try:
        save_file({k: v.contiguous() for k, v in state.adapter_state().items()}, str(tmp / "adapter.safetensors"))
        torch.save(state.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(state.dropout_generator.get_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": state.step, "status": state.status.value}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prune_checkpoints(task_dir: Path, keep: Path) -> None:
    """Remove the task's checkpoints other than `keep`."""
    for _, path in checkpoint_dirs(task_dir):
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


def restore_checkpoint(checkpoint: Path, state: TaskState) -> None:
    """Load a checkpoint into a freshly added task (same config) and set its step."""
    try:
        info = json.loads((checkpoint / "state.json").read_text())
        load_task_state(state.config.name, state.modules, load_file(str(checkpoint / "adapter.safetensors")))
        state.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        state.dropout_generator.set_state(torch.load(checkpoint / "rng.pt", weights_only=True))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{checkpoint}: cannot restore checkpoint: {exc}") from None
    state.step = int(info["step"])
    state.status = TaskStatus(info["status"])
