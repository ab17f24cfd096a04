"""`muxtune-run plan.yaml [--resume]`: replay a plan; adapters, metrics and checkpoints land in
the plan's output_dir. Exit status: 0 done, 2 bad input, 3 done but some task diverged."""

from __future__ import annotations

import argparse
import sys

from muxtune.common.cli import run_command
from muxtune.common.text import aligned_columns
from muxtune.plans import load_plan

from .executor import PlanExecutor

PROG = "muxtune-run"
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
        f"peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Run a compiled MuxTune plan.")
    parser.add_argument("plan", help="plan file written by muxtune-compile")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = parser.parse_args(argv)

    def run() -> int:
        plan = load_plan(args.plan)
        summary = PlanExecutor(plan, resume=args.resume).run()
        print(format_summary(summary))
        print(f"outputs in {plan.job.output_dir}")
        diverged = [name for name, task in summary["tasks"].items() if task["status"] == "diverged"]
        if diverged:
            print(f"{PROG}: diverged and stopped: {', '.join(diverged)}", file=sys.stderr)
            return DIVERGED_EXIT
        return 0

    hint = f"continue with: muxtune-run {args.plan} --resume"
    return run_command(PROG, run, args.debug, interrupt_hint=hint)


if __name__ == "__main__":
    sys.exit(main())
