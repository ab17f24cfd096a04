"""One progress display for a job: each task's step, loss and tokens/s.

On a terminal the per-task table is redrawn in place; otherwise (logs, CI) every optimizer step
prints one plain line.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO


@dataclass
class TaskProgress:
    name: str
    total_steps: int
    step: int = 0
    loss: float | None = None
    tokens: int = 0
    status: str = "waiting"


class ProgressDisplay:
    """Progress of all tasks of a job on `stream` (stderr by default)."""

    def __init__(self, tasks: list[tuple[str, int]], stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.tasks = {name: TaskProgress(name, steps) for name, steps in tasks}
        self.started = time.perf_counter()
        self._drawn_lines = 0
        self._width = max((len(name) for name, _ in tasks), default=4)

    def restart_clock(self) -> None:
        """Measure tokens/s from now on (after the backbone is loaded)."""
        self.started = time.perf_counter()

    def set_progress(self, name: str, step: int, status: str = "running") -> None:
        """Record where a task starts (after a resume) without printing a step line."""
        self.tasks[name].step = step
        self.tasks[name].status = status

    def step(self, name: str, step: int, loss: float, tokens: int, status: str = "running") -> None:
        """Record a finished optimizer step of `name` and show it."""
        task = self.tasks[name]
        task.step, task.loss, task.status = step, loss, status
        task.tokens += tokens
        if self.interactive:
            self._redraw()
        else:
            self._print(self._line(task))

    def message(self, text: str) -> None:
        """A line of its own above the table (warnings, checkpoints, divergence)."""
        if self.interactive:
            self._clear()
        self._print(text)
        if self.interactive:
            self._redraw()

    def close(self) -> None:
        if self.interactive:
            self._redraw()
            self._drawn_lines = 0

    def _line(self, task: TaskProgress) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        loss = f"{task.loss:8.4f}" if task.loss is not None else "       -"
        return (
            f"{task.name:<{self._width}}  step {task.step:>5}/{task.total_steps:<5} loss {loss}  "
            f"{task.tokens / elapsed:9.1f} tok/s  {task.status}"
        )

    def _clear(self) -> None:
        if self._drawn_lines:
            self.stream.write(f"\x1b[{self._drawn_lines}F\x1b[J")
            self._drawn_lines = 0

    def _redraw(self) -> None:
        self._clear()
        lines = [self._line(task) for task in self.tasks.values()]
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn_lines = len(lines)

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
