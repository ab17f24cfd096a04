"""The output folder of a run: one writer at a time, never someone else's files.

`RunFolder` is what every write of a run goes through first:
- an advisory lock (`flock` on `.muxtune.lock`, which holds the owner's pid) is held for the
  whole run and released on any exit, a kill included; a second run on the same folder is
  refused at once, naming the process that holds it;
- `run.json` records everything that determines the tasks' results (the plan minus its
  predictions, plus a digest of every dataset); `--resume` with any difference is refused,
  listing what differs;
- a folder is written into only when it is empty or holds a run of this very plan: the user's
  own files are never touched, and a task folder that is a symbolic link is refused.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from muxtune.common.errors import UserError
from muxtune.common.files import atomic_write_bytes
from muxtune.common.text import quote
from muxtune.plans import Plan, plan_to_dict

from .checkpoint import JOB_RECORD

RUN_RECORD = "run.json"
LOCK_FILE = ".muxtune.lock"
RECORD_FORMAT = 2
_MAX_LISTED = 8


class RunError(UserError):
    """A plan that cannot be run here (changed data, a foreign or busy output folder, ...)."""


def file_digest(path: Path | str) -> str:
    """sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_record(plan: Plan) -> dict[str, Any]:
    """What `run.json` holds: the plan as data without what cannot change a result (its
    predictions, the spec file's path and where metrics are reported), and the sha256 of each
    task's dataset."""
    data = plan_to_dict(plan)
    data.pop("predictions", None)
    data["job"].pop("spec_path", None)
    data["job"].pop("report_to", None)
    return {
        "format": RECORD_FORMAT,
        "plan": data,
        "data_sha256": {task.name: file_digest(task.data.path) for task in plan.tasks},
    }


def record_differences(recorded: Any, current: Any, path: str = "") -> list[str]:
    """Field paths where two plain records differ, each with both values (bounded)."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        out = []
        for key in list(recorded) + [k for k in current if k not in recorded]:
            where = f"{path}.{key}" if path else str(key)
            if key not in current:
                out.append(f"{where}: only in the run in this folder")
            elif key not in recorded:
                out.append(f"{where}: only in this plan")
            else:
                out += record_differences(recorded[key], current[key], where)
        return out
    if isinstance(recorded, list) and isinstance(current, list) and len(recorded) == len(current):
        out = []
        for index, (a, b) in enumerate(zip(recorded, current)):
            out += record_differences(a, b, f"{path}[{index}]")
        return out
    if recorded != current:
        return [f"{path or 'record'}: {quote(recorded)} in the run in this folder, {quote(current)} in this plan"]
    return []


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


class RunFolder:
    """Exclusive, checked access to a plan's output folder for one run (a context manager)."""

    def __init__(self, plan: Plan, *, resume: bool) -> None:
        self.path = Path(plan.job.output_dir)
        self.plan = plan
        self.resume = resume
        self.task_names = [t.name for t in plan.tasks]
        self.record: dict[str, Any] | None = None
        self.restarted = False
        self._lock_fd: int | None = None
        self._created = False
        self._record_written = False

    def __enter__(self) -> RunFolder:
        self.record = run_record(self.plan)
        self.check()
        self._lock()
        try:
            self.check()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._unlock()

    def check(self) -> None:
        """Refuse a folder that is not ours to write: see the module docstring."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"output_dir: {self.path} exists and is not a folder")
        existing = self._read_record()
        if existing is None:
            self._check_no_foreign_files()
        else:
            self._check_same_run(existing)
        for name in self.task_names:
            task_dir = self.path / name
            if task_dir.is_symlink():
                raise RunError(
                    f"{task_dir}: is a symbolic link; a run writes only inside output_dir, "
                    "so remove the link or choose another output_dir"
                )

    def _read_record(self) -> Any:
        path = self.path / RUN_RECORD
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError):
            raise RunError(
                f"{path}: damaged run record (not valid JSON); this folder's run cannot be checked, "
                "so it is not written into: choose another output_dir"
            ) from None

    def _check_no_foreign_files(self) -> None:
        if not self.path.is_dir():
            return
        foreign = sorted(p.name for p in self.path.iterdir() if p.name != LOCK_FILE)
        if not foreign:
            return
        holder = self._lock_holder() if self._lock_fd is None else None
        if holder is not None:  # another run is setting the folder up: its record is not written yet
            raise self._in_use(holder)
        what = "nothing to resume here" if self.resume else "not an empty folder"
        raise RunError(
            f"output_dir: {self.path} is {what}: it holds {_listed(foreign)} but no {RUN_RECORD} of a MuxTune "
            "run, and a run never writes over files it did not make; choose an empty or new output_dir"
        )

    def _check_same_run(self, existing: Any) -> None:
        differences = record_differences(existing, self.record)
        if differences:
            raise RunError(
                f"{self.path / RUN_RECORD}: the run in this folder was made from a different plan or data; "
                + ("resuming it with this plan would mix the two" if self.resume else "choose another output_dir")
                + f". Differences ({len(differences)}): "
                + "; ".join(differences[:_MAX_LISTED])
                + (f"; and {len(differences) - _MAX_LISTED} more" if len(differences) > _MAX_LISTED else "")
            )
        if self.resume:
            return
        if (self.path / JOB_RECORD).exists():
            raise RunError(
                f"output_dir: {self.path} already holds a run of this plan with checkpoints; "
                "continue it with --resume, or choose another output_dir"
            )
        self.restarted = True

    def _lock(self) -> None:
        try:
            self.path.mkdir(parents=True)
            self._created = True
        except FileExistsError:
            pass  # an existing folder, or one another run created a moment ago: the lock decides
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise self._in_use(holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _in_use(self, holder: str) -> RunError:
        return RunError(
            f"output_dir: {self.path} is in use by another muxtune-run ({holder or 'pid unknown'}); "
            "wait for it to end, or choose another output_dir"
        )

    def _lock_holder(self) -> str | None:
        """What the lock file says of the run holding it (possibly empty), or None when no run
        holds it; the folder is not written to."""
        try:
            fd = os.open(self.path / LOCK_FILE, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        finally:
            os.close(fd)
        return None

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        if not self._record_written:
            self._remove_own_traces()
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
        self._lock_fd = None

    def _remove_own_traces(self) -> None:
        """A run that stopped before writing its record leaves the folder as it found it."""
        if self._created:
            shutil.rmtree(self.path, ignore_errors=True)
        elif not self.restarted:
            (self.path / LOCK_FILE).unlink(missing_ok=True)

    def write_record(self) -> None:
        """Write `run.json` (the run has started: from now on the folder holds its files)."""
        assert self.record is not None and self._lock_fd is not None, "write_record needs the folder locked"
        atomic_write_bytes(self.path / RUN_RECORD, (json.dumps(self.record, indent=2) + "\n").encode())
        self._record_written = True


def is_muxtune_run(path: Path) -> bool:
    """True when ``path`` holds a MuxTune run (its run record)."""
    return (path / RUN_RECORD).is_file()
