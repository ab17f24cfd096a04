"""`muxtune-run plan.yaml [--resume] [--trace] [--profile]`: replay a plan; adapters, metrics and checkpoints land in
the plan's output_dir. A plan for several ranks starts one process per rank on this machine
(see `distributed.launcher`); under torchrun each process runs its own rank. Exit status: 0
done, 2 bad input, 3 done but some task diverged, 1 a rank failed.

torch is imported only once the command has chosen its allocator (`muxtune.common.allocator`)."""

from __future__ import annotations

import os

from muxtune.common.allocator import restart_with_allocator
from muxtune.common.cli import console_entry, run_command

from .run_options import PROG, RunOptions, run_arguments

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        restart_with_allocator(PROG)
    args = run_arguments("Run a compiled MuxTune plan.").parse_args(argv)

    options = RunOptions.from_args(args)

    def run() -> int:
        from muxtune.plans import load_plan

        from .executor import PlanExecutor
        from .launch import run_rank
        from .summary_text import report_summary

        plan = load_plan(args.plan)
        if plan.placement.num_ranks > 1:
            if "RANK" in os.environ:
                return run_rank(args.plan, options)
            from .distributed.launcher import launch_ranks

            return launch_ranks(args.plan, plan.placement.num_ranks, options.flags())
        summary = PlanExecutor(plan, resume=options.resume, trace=options.trace, profile=options.profile).run()
        return report_summary(PROG, summary, plan.job.output_dir)

    hint = f"continue with: muxtune-run {args.plan} --resume"
    return run_command(PROG, run, args.debug, interrupt_hint=hint)


entry = console_entry(main)


if __name__ == "__main__":
    entry()
