"""`muxtune-compile job.yaml -o plan.yaml [key=value ...]`: compile a job spec into a plan."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from muxtune.common.cli import run_command
from muxtune.plans import save_plan
from muxtune.specs import load_job_spec

from .compile import DEFAULT_POLICY, DEFAULT_TASK_TOKENS, compile_job

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
    parser.add_argument("--no-fuse", action="store_true", help="one hTask per task instead of one for all")
    parser.add_argument(
        "--task-tokens",
        type=int,
        default=DEFAULT_TASK_TOKENS,
        help=f"most tokens one task brings to a micro-batch (default {DEFAULT_TASK_TOKENS})",
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
        result = compile_job(
            spec,
            fuse=not args.no_fuse,
            task_tokens=args.task_tokens,
            policy=args.partition,
            spec_path=str(Path(args.spec).resolve()),
        )
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
        plan = result.plan
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


if __name__ == "__main__":
    sys.exit(main())
