"""`muxtune-compile job.yaml -o plan.yaml [key=value ...]`: compile a job spec into a plan."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from muxtune.common.cli import console_entry, run_command
from muxtune.plans import save_plan
from muxtune.specs import load_job_spec

from .compile import DEFAULT_POLICY, compile_job
from .cost.profile import load_profile
from .explain import explain

PROG = "muxtune-compile"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Compile a MuxTune job spec into a plan file.")
    parser.add_argument("spec", help="job spec (YAML)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="spec overrides, e.g. dtype=bf16 tasks.sentiment.lr=1e-4 tasks.*.steps=2",
    )
    parser.add_argument("-o", "--output", help="where to write the plan (YAML)")
    parser.add_argument("--validate", action="store_true", help="only check the spec and its data; write nothing")
    fusion = parser.add_mutually_exclusive_group()
    fusion.add_argument("--no-fuse", action="store_true", help="one hTask per task instead of the planner's choice")
    fusion.add_argument(
        "--fuse-all", action="store_true", help="one hTask of every task instead of the planner's choice"
    )
    parser.add_argument(
        "--task-tokens",
        type=int,
        default=None,
        help="most tokens one task brings to a micro-batch (default: the planner decides)",
    )
    parser.add_argument(
        "--no-align",
        action="store_true",
        help="no chunk alignment: token budgets need not be multiples of the device's chunk size",
    )
    parser.add_argument(
        "--streams",
        type=int,
        default=None,
        help="most hTasks run side by side on one device (default: as many as the device runs at once, 2 on a "
        "CPU; 1 runs them one after another)",
    )
    parser.add_argument("--profile", help="a profile written by muxtune-profile to calibrate the cost model with")
    parser.add_argument(
        "--explain", action="store_true", help="print the hTasks and why, and the predictions against the alternatives"
    )
    parser.add_argument(
        "--partition",
        default=DEFAULT_POLICY,
        help=f"how the backbone graph is cut into subgraphs: per_layers(N) or fine (default {DEFAULT_POLICY})",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if not args.validate and not args.output:
        parser.error("-o/--output is required (or pass --validate)")

    def compile_command() -> int:
        spec = load_job_spec(args.spec, args.overrides)
        profile = load_profile(args.profile) if args.profile else None
        options = dict(
            task_tokens=args.task_tokens,
            policy=args.partition,
            profile=profile,
            align=not args.no_align,
            streams=args.streams,
        )
        fusion = "no_fuse" if args.no_fuse else "fuse" if args.fuse_all else "solve"
        result = compile_job(spec, fusion=fusion, spec_path=str(Path(args.spec).resolve()), **options)
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
        plan = result.plan
        if args.explain:
            print(explain(plan, {mode: compile_job(spec, fusion=mode, **options).plan for mode in ("no_fuse", "fuse")}))
        summary = (
            f"{len(plan.tasks)} tasks, {len(plan.phases)} phase(s), "
            f"{len(plan.phases[0].htasks)} hTask(s) in the first, {len(plan.partition.subgraphs)} subgraphs, "
            f"{plan.predictions.num_rounds} rounds, ~{plan.predictions.tokens_per_round} tokens per round"
        )
        if args.validate:
            print(f"{args.spec}: valid ({summary})")
            return 0
        path = save_plan(plan, args.output)
        print(f"wrote {path}: {summary}")
        return 0

    return run_command(PROG, compile_command, args.debug)


entry = console_entry(main)


if __name__ == "__main__":
    entry()
