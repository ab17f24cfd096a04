"""Per-task run records: `metrics.jsonl` and `manifest.jsonl`, one line per optimizer step.

Lines are appended and flushed as steps finish. On resume, lines past the step a task restarts
from are dropped (rewritten through a temporary file), so the logs match an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

from muxtune.common.files import atomic_write_bytes


class StepLog:
    """An append-only JSONL file of records that each carry a `step`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash ends the usable log
        return records

    def truncate_after(self, step: int) -> None:
        """Keep only the records of steps <= `step` (0 empties the log)."""
        kept = [r for r in self.records() if int(r.get("step", 0)) <= step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
