"""`muxtune-viz`: a plan, or a run, as one self-contained HTML page.

    muxtune-viz plan.yaml -o plan.html      # phases, partition, simulated timeline per rank and stream
    muxtune-viz RUN_DIR -o run.html         # the same for the run's plan, plus loss curves, step
                                            # times and predicted against measured round times

The timeline is the compiler's simulated round (the plan's programs replayed on its cost model,
`--profile FILE` to calibrate it as `muxtune-compile --profile` does).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from muxtune.common.cli import console_entry, run_command
from muxtune.common.errors import UserError
from muxtune.common.files import atomic_write_text
from muxtune.compiler.cost.profile import load_profile
from muxtune.compiler.replay import replay_plan
from muxtune.plans import Plan, load_plan, plan_from_dict
from muxtune.runtime.run_folder import RUN_RECORD
from muxtune.runtime.run_logs import StepLog

from .viz_html import RunRecord, render_page

PROG = "muxtune-viz"


class VizError(UserError):
    """A plan or run folder that cannot be shown."""


def read_run(run_dir: Path) -> tuple[Plan, RunRecord]:
    """The run's plan (from `run.json`) and what it measured (metrics and summary)."""
    record_path = run_dir / RUN_RECORD
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        data = dict(record["plan"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VizError(f"{record_path}: not a MuxTune run record ({exc})") from None
    data.setdefault("predictions", {"num_rounds": 0, "tokens_per_round": 0})
    data["job"] = {"spec_path": None, **data.get("job", {})}
    plan = plan_from_dict(data)
    steps = {}
    for task in plan.tasks:
        records = StepLog(run_dir / task.name / "metrics.jsonl").records()
        steps[task.name] = [(int(r["step"]), float(r["loss"]), float(r["seconds"])) for r in records]
    summary_path = run_dir / "summary.json"
    timings = json.loads(summary_path.read_text(encoding="utf-8")).get("phases", []) if summary_path.is_file() else []
    return plan, RunRecord(steps=steps, phase_timings=timings)


def visualize(source: Path, output: Path, profile_path: Path | None = None) -> Path:
    """Write the page for a plan file or a run folder to ``output``."""
    if source.is_dir():
        plan, run = read_run(source)
    else:
        plan, run = load_plan(source), None
    profile = load_profile(profile_path) if profile_path else None
    return atomic_write_text(output, render_page(plan, replay_plan(plan, profile), run))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="a plan file, or a run's output_dir")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the HTML file to write")
    parser.add_argument("--profile", type=Path, help="a muxtune-profile file for the simulated timeline")
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    def write() -> int:
        written = visualize(args.source, args.output, args.profile)
        print(f"wrote {written}")
        return 0

    return run_command(PROG, write, args.debug)


entry = console_entry(main)


if __name__ == "__main__":
    entry()
