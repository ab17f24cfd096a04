"""The run summary as `muxtune-run` prints it at the end, and its exit status."""

from __future__ import annotations

import sys

from muxtune.common.text import aligned_columns

DIVERGED_EXIT = 3


def format_summary(summary: dict) -> str:
    """The per-task table printed at the end of a run."""
    rows = [("task", "status", "steps", "loss start", "loss end", "tokens/s")]
    for name, task in summary["tasks"].items():
        first = f"{task['first_loss']:.4f}" if task["first_loss"] is not None else "-"
        last = f"{task['last_loss']:.4f}" if task["last_loss"] is not None else "-"
        rows.append((name, task["status"], str(task["steps"]), first, last, f"{task['tokens_per_second']:.1f}"))
    lines = aligned_columns(rows)
    lines.append(
        f"total: {summary['tokens_per_second']:.1f} tokens/s over {summary['train_seconds']:.1f} s of training "
        f"({summary['wall_seconds']:.1f} s in all), "
        f"peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB (malloc: {summary.get('allocator', 'system')})"
    )
    return "\n".join(lines)


def report_summary(prog: str, summary: dict, output_dir: str) -> int:
    """Print the summary table and where the outputs are; the exit status (3 when a task diverged)."""
    print(format_summary(summary))
    print(f"outputs in {output_dir}")
    diverged = [name for name, task in summary["tasks"].items() if task["status"] == "diverged"]
    if diverged:
        print(f"{prog}: diverged and stopped: {', '.join(diverged)}", file=sys.stderr)
        return DIVERGED_EXIT
    return 0
