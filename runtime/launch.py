"""One rank of a multi-rank plan: ``torchrun --nproc-per-node N -m muxtune.runtime.launch
plan.yaml [--resume]`` (what `muxtune-run` starts itself for such a plan; use torchrun directly
where processes are started another way, several nodes included, with ``output_dir`` on a file
system every node shares).

Each rank joins the process group, replays its program and leaves; rank 0 shows the progress
and prints the summary. Exit status as `muxtune-run`'s: 0 done, 2 bad input, 3 done but some
task diverged, 1 an exchange with another rank failed or timed out (the message names it).
"""

from __future__ import annotations

import io
import os
import sys

import torch

from muxtune.common.allocator import restart_with_allocator
from muxtune.common.cli import run_command
from muxtune.plans import load_plan

from .backbone import torch_device
from .distributed.world import CommunicationError, close_world, init_world
from .executor import PlanExecutor
from .progress import ProgressDisplay
from .run_options import PROG, RunOptions, run_arguments
from .summary_text import report_summary

FAILED_EXIT = 1


def threads_per_rank() -> int:
    """An equal share of this machine's cores for each local rank (at least one)."""
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, (os.cpu_count() or 1) // local_ranks)


def run_rank(plan_path: str, options: RunOptions) -> int:
    """Replay this rank's program of the plan (rank and world size from the environment)."""
    plan = load_plan(plan_path)
    device = torch_device(plan.programs[0].device)
    if device.type == "cpu":
        torch.set_num_threads(threads_per_rank())
    world = init_world(plan.placement, device)
    finished = False
    try:
        tasks = [(t.name, t.steps) for t in plan.tasks]
        progress = ProgressDisplay(tasks) if world.lead else ProgressDisplay(tasks, io.StringIO())
        summary = PlanExecutor(
            plan,
            resume=options.resume,
            progress=progress,
            world=world,
            trace=options.trace,
            profile=options.profile,
        ).run()
        finished = True
    except CommunicationError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return FAILED_EXIT
    finally:
        close_world(world, finished)
    return report_summary(PROG, summary, plan.job.output_dir) if world.lead else 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        restart_with_allocator(PROG)
    args = run_arguments("Run one rank of a compiled multi-rank MuxTune plan.").parse_args(argv)
    hint = f"continue with: muxtune-run {args.plan} --resume"
    options = RunOptions.from_args(args)
    return run_command(PROG, lambda: run_rank(args.plan, options), args.debug, interrupt_hint=hint)


if __name__ == "__main__":
    sys.exit(main())
