"""Benchmark: the planner's plan against "fuse everything" and "one hTask per task", run side by
side on this machine, each with its predicted round time beside the measured one.

Each (cost source, fusion mode) is compiled: the device table alone and, with ``--profile``, a
`muxtune-profile` calibration; plans that decide the same hTasks run once. Every run is the
user's path (`python -m muxtune.runtime.cli plan.yaml`) in its own process; the measured round
time is the run summary's median (the first round warms up).

    python -m muxtune.tools.bench_planner --steps 8 [--profile prof.yaml] [--spec job.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from muxtune.compiler.compile import compile_job
from muxtune.compiler.cost.profile import Profile, load_profile
from muxtune.plans import Plan, save_plan
from muxtune.specs import load_job_spec

DEFAULT_SPEC = Path(__file__).resolve().parent / "data" / "quickstart.yaml"
MODES = {"solve": "planner", "fuse": "fuse all", "no_fuse": "no fusion"}


@dataclass
class Compiled:
    """One compiled (cost source, mode) and the run that measured its decisions."""

    source: str
    mode: str
    plan: Plan
    run: int


def groups_of(plan: Plan) -> str:
    """The first phase's hTasks: tasks joined by '+', micro-batches after 'x'."""
    return "; ".join(f"{'+'.join(h.tasks)} x{h.num_microbatches}" for h in plan.phases[0].htasks)


def compile_all(spec_path: Path, overrides: list[str], profile: Profile | None, tmp: Path) -> list[Compiled]:
    """Every (source, mode); plans deciding the same phases share one run number."""
    sources = [("device table", None)] + ([("profile", profile)] if profile is not None else [])
    compiled: list[Compiled] = []
    decisions: dict[object, int] = {}
    for mode in MODES:
        for source, calibration in sources:
            spec = load_job_spec(spec_path, [*overrides, f"output_dir={tmp}/run-{len(decisions)}"])
            plan = compile_job(spec, fusion=mode, profile=calibration).plan
            key = plan.phases
            if key not in decisions:
                decisions[key] = len(decisions)
                save_plan(plan, tmp / f"plan-{decisions[key]}.yaml")
            compiled.append(Compiled(source, mode, plan, decisions[key]))
    return compiled


def run_plan(plan_path: Path, output_dir: Path) -> dict:
    """`muxtune-run` on the plan in its own process; the run's summary."""
    done = subprocess.run(
        [sys.executable, "-m", "muxtune.runtime.cli", str(plan_path)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{plan_path}: the run failed:\n{done.stderr}")
    return json.loads((output_dir / "summary.json").read_text())


def report(compiled: list[Compiled], summaries: dict[int, dict]) -> list[str]:
    """A markdown table: per (mode, source) the hTasks, predicted and measured round time, the
    prediction's error, measured tokens/s and peak memory, and the speed ratio to the planner."""
    planner = {c.source: summaries[c.run]["tokens_per_second"] for c in compiled if c.mode == "solve"}
    lines = [
        "| plan | cost model | hTasks (first phase) | predicted s/round | measured s/round | error "
        "| tokens/s | vs planner | peak RSS GiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in compiled:
        summary = summaries[c.run]
        timing = summary["phases"][0]
        predicted, measured = c.plan.predictions.phases[0].seconds_per_round, timing["median_round_seconds"]
        speed = summary["tokens_per_second"]
        lines.append(
            f"| {MODES[c.mode]} (run {c.run}) | {c.source} | {groups_of(c.plan)} | {predicted:.3f} | {measured:.3f} "
            f"| {predicted / measured - 1:+.1%} | {speed:,.0f} | {speed / planner[c.source]:.2f}x "
            f"| {summary['peak_memory_bytes'] / 2**30:.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muxtune.tools.bench_planner", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per task (rounds)")
    parser.add_argument("--profile", type=Path, help="a muxtune-profile file to calibrate the cost model with")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    profile = load_profile(args.profile) if args.profile else None
    overrides = [
        f"tasks.*.steps={args.steps}",
        "tasks.*.schedule.warmup_steps=0",
        "tasks.*.save_every=0",
        *args.overrides,
    ]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        compiled = compile_all(args.spec, overrides, profile, tmp)
        summaries = {}
        for run in sorted({c.run for c in compiled}):
            summaries[run] = run_plan(tmp / f"plan-{run}.yaml", tmp / f"run-{run}")
            print(f"run {run} done: {summaries[run]['tokens_per_second']:.0f} tokens/s", file=sys.stderr)
    print("\n".join(report(compiled, summaries)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
