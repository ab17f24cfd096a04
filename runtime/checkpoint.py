"""Per-task checkpoints: adapter, optimizer and random-stream state, written atomically.

Layout: `<task_dir>/checkpoints/step-000010/` holding `adapter.safetensors`, `optimizer.pt`,
`rng.pt` and `state.json`. A checkpoint is assembled in a hidden temporary folder and renamed
into place, so a crash never leaves a partial `step-*` folder; older checkpoints are removed
only after the new one is in place.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .engine import TaskState, TaskStatus, load_task_state

CHECKPOINTS = "checkpoints"
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


def save_checkpoint(task_dir: Path, state: TaskState, *, keep: int = 1) -> Path:
    """Write the task's state after its current step; keeps the newest `keep` checkpoints."""
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
    for _, old in checkpoint_dirs(task_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
