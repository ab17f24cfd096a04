"""TensorBoard event files of each task's step metrics (``report_to: tensorboard``).

A task logs to ``<task>/tensorboard/`` the scalars of `SCALARS`, keyed by its step, the same
values as its ``metrics.jsonl``. Events are flushed at each checkpoint (before its job record is
written) and at the end. Each process writes a new event file in the folder; before a task logs
again (a resume, or a restart from scratch) the event files already there are cut back to the
steps its ``metrics.jsonl`` keeps, so TensorBoard never shows a step twice.

The tensorboard package is optional: it is imported only when a plan asks for it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from muxtune.common.files import atomic_write_bytes

from .run_folder import RunError

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

TENSORBOARD = "tensorboard"
TENSORBOARD_DIR = "tensorboard"
"""A task's event folder, inside its output folder."""
EVENT_FILE_PREFIX = "events.out.tfevents."
MISSING_PACKAGE = "report_to: tensorboard needs the tensorboard package: pip install tensorboard"

SCALARS: tuple[tuple[str, str], ...] = (
    ("train/loss", "loss"),
    ("train/learning_rate", "lr"),
    ("train/grad_norm", "grad_norm"),
    ("train/tokens", "tokens"),
    ("train/step_seconds", "seconds"),
)
"""(TensorBoard tag, ``metrics.jsonl`` key) of every scalar logged per step."""


def tensorboard_installed() -> bool:
    """True when event files can be written here (torch's writer finds the tensorboard package)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def report_to_problems(report_to: Sequence[str]) -> list[str]:
    """Why the integrations in ``report_to`` cannot work here (a missing package); empty if they can."""
    return [MISSING_PACKAGE] if TENSORBOARD in report_to and not tensorboard_installed() else []


def truncate_event_file(path: Path, step: int) -> None:
    """Keep only the events of steps <= ``step`` in one event file (and no record a crash cut
    short); a file left without any scalar is removed."""
    from google.protobuf.message import DecodeError
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    kept = io.BytesIO()
    writer = RecordWriter(kept)
    has_scalars = False
    for record in RawEventFileLoader(str(path)).Load():
        try:
            event = Event.FromString(record)
        except DecodeError:
            break
        if event.HasField("summary"):
            if event.step > step:
                continue
            has_scalars = True
        writer.write(record)
    if not has_scalars:
        path.unlink()
    elif kept.getvalue() != path.read_bytes():
        atomic_write_bytes(path, kept.getvalue())


class TensorBoardLog:
    """One task's scalars in ``directory``; this process's event file is made at its first step."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._writer: SummaryWriter | None = None

    def event_files(self) -> list[Path]:
        """The event files in the folder, oldest first (their names start with a timestamp)."""
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob(EVENT_FILE_PREFIX + "*"))

    def truncate_after(self, step: int) -> None:
        """Drop the logged events of steps > ``step`` (0 drops them all)."""
        for path in self.event_files():
            truncate_event_file(path, step)

    def log(self, record: Mapping[str, Any]) -> None:
        """Log one ``metrics.jsonl`` record's scalars at its step (a missing value is skipped)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.directory))
        step = int(record["step"])
        for tag, key in SCALARS:
            value = record.get(key)
            if value is not None:
                self._writer.add_scalar(tag, float(value), step)

    def flush(self) -> None:
        """Write every event logged so far to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close this process's event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class TensorBoardLogs:
    """The TensorBoard logs of a run's tasks: none unless ``report_to`` holds ``tensorboard``.
    A context manager that closes (and so flushes) every log on exit, a failed run included."""

    def __init__(self, report_to: Sequence[str]) -> None:
        self.enabled = TENSORBOARD in report_to
        self.report_to = tuple(report_to)
        self.logs: dict[str, TensorBoardLog] = {}

    def require_packages(self) -> None:
        """Raise `RunError` when the tensorboard package is needed and missing."""
        problems = report_to_problems(self.report_to)
        if problems:
            raise RunError(problems)

    def open_task(self, name: str, task_directory: Path, logged_steps: int) -> None:
        """Start task ``name``'s log, its earlier events cut back to ``logged_steps``."""
        if not self.enabled:
            return
        log = TensorBoardLog(task_directory / TENSORBOARD_DIR)
        log.truncate_after(logged_steps)
        self.logs[name] = log

    def log_step(self, name: str, record: Mapping[str, Any]) -> None:
        """Log one step of task ``name`` (nothing when the run does not report to tensorboard)."""
        log = self.logs.get(name)
        if log is not None:
            log.log(record)

    def flush(self) -> None:
        """Write every task's events logged so far to disk."""
        for log in self.logs.values():
            log.flush()

    def close(self) -> None:
        """Flush and close every task's event file."""
        for log in self.logs.values():
            log.close()

    def __enter__(self) -> TensorBoardLogs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
