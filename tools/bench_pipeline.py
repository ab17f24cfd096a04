"""Benchmark: temporal multiplexing on a CPU pipeline. The planner's plan (hTasks interleaved in
one 1F1B schedule, so one hTask's transfer or bubble is filled by another's compute) against the
same tasks fused into one hTask, both on the same pipeline, each run by `muxtune-run --trace`.

Reported per plan: hTasks, tokens/s, the bubble fraction predicted by the plan's simulation and
measured from the ranks' traces (1 - compute time / (ranks x round time), over the rounds after
the first), and the transfers that overlapped another hTask's compute on the sending rank
(from the send's issue until the peer received it).

    python -m muxtune.tools.bench_pipeline --layers 8 --steps 6 [--stages 2] [--spec job.yaml]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from muxtune.common.text import aligned_columns
from muxtune.compiler.compile import compile_job
from muxtune.plans import Plan, save_plan
from muxtune.runtime.trace import TRACE_DIR
from muxtune.specs import load_job_spec

from .truncate_model import truncate_model

DEFAULT_SPEC = Path(__file__).resolve().parent / "data" / "quickstart.yaml"
EXCHANGE_OPS = ("send", "recv", "all_reduce")


@dataclass(frozen=True)
class TraceFigures:
    """What a run's traces show."""

    bubble_fraction: float
    overlapped_transfers: int
    transfers: int
    overlapped_seconds: float


def load_events(output_dir: Path) -> list[dict]:
    events = []
    for path in sorted((output_dir / TRACE_DIR).glob("rank-*.json")):
        events += [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    return events


def measured_bubble(events: list[dict], num_ranks: int) -> float:
    """1 - compute time / (ranks x round time), over every round after the first."""
    spans: dict[int, list[float]] = {}
    busy = 0.0
    first_round = min((e["args"]["round"] for e in events), default=0)
    for event in events:
        round_index = event["args"]["round"]
        if round_index == first_round:
            continue
        start, end = event["ts"], event["ts"] + event["dur"]
        span = spans.setdefault(round_index, [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)
        if event["args"]["op"] not in EXCHANGE_OPS:
            busy += event["dur"]
    total = sum(end - start for start, end in spans.values()) * num_ranks
    return 1.0 - busy / total if total > 0 else 0.0


def transfer_overlap(events: list[dict]) -> tuple[int, int, float]:
    """Sends whose transfer (issue on the sender until the peer's receive ended) overlapped
    compute of another hTask on the sender: (overlapped, all, overlapped seconds)."""
    received = {}
    compute = defaultdict(list)
    for event in events:
        a = event["args"]
        if a["op"] == "recv":
            received[(a["peer"], event["pid"], a["round"], a["htask"], a["microbatch"], a["grad"])] = (
                event["ts"] + event["dur"]
            )
        elif a["op"] not in EXCHANGE_OPS and "htask" in a:
            compute[event["pid"]].append((event["ts"], event["ts"] + event["dur"], a["htask"]))
    overlapped = transfers = 0
    seconds = 0.0
    for event in events:
        a = event["args"]
        if a["op"] != "send":
            continue
        arrived = received.get((event["pid"], a["peer"], a["round"], a["htask"], a["microbatch"], a["grad"]))
        if arrived is None:
            continue
        transfers += 1
        shared = sum(
            max(0.0, min(end, arrived) - max(start, event["ts"]))
            for start, end, htask in compute[event["pid"]]
            if htask != a["htask"]
        )
        if shared > 0:
            overlapped += 1
            seconds += shared / 1e6
    return overlapped, transfers, seconds


def trace_figures(output_dir: Path, num_ranks: int) -> TraceFigures:
    events = load_events(output_dir)
    overlapped, transfers, seconds = transfer_overlap(events)
    return TraceFigures(measured_bubble(events, num_ranks), overlapped, transfers, seconds)


def run_traced(plan_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "muxtune.runtime.cli", str(plan_path), "--trace"], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{plan_path}: the run failed:\n{done.stderr}")


def predicted_bubble(plan: Plan) -> float:
    """The plan's bubble fraction, averaged over its rounds."""
    rounds = {phase.id: phase.num_rounds for phase in plan.phases}
    total = sum(rounds.values())
    return sum(p.bubble_fraction * rounds[p.phase] for p in plan.predictions.phases) / max(1, total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(DEFAULT_SPEC), help="job spec (default: the quickstart's four tasks)")
    parser.add_argument("--layers", type=int, default=8, help="the model's first N layers (0: the whole model)")
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages, one CPU rank each")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per task")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="muxtune-bench-pipeline-") as tmp:
        root = Path(tmp)
        model = load_job_spec(args.spec).model
        if args.layers:
            model = str(truncate_model(model, args.layers, root / "model"))
        overrides = [
            f"model={model}",
            "cluster.device=cpu",
            f"cluster.num_devices={args.stages}",
            f"cluster.pipeline_parallel={args.stages}",
            "cluster.tensor_parallel=1",
            f"tasks.*.steps={args.steps}",
            "tasks.*.schedule.warmup_steps=0",
        ]
        rows = [("plan", "hTasks", "tokens/s", "bubble predicted", "bubble measured", "transfers overlapped")]
        speeds = {}
        for mode, label in (("solve", "planner (interleaved)"), ("fuse", "one hTask")):
            out = root / mode
            job = load_job_spec(args.spec, [*overrides, f"output_dir={out / 'out'}"])
            plan = compile_job(job, fusion=mode).plan
            save_plan(plan, out / "plan.yaml")
            run_traced(out / "plan.yaml")
            summary = json.loads((out / "out" / "summary.json").read_text())
            figures = trace_figures(out / "out", args.stages)
            speeds[mode] = summary["tokens_per_second"]
            rows.append(
                (
                    label,
                    str(len(plan.phases[0].htasks)),
                    f"{summary['tokens_per_second']:,.0f}",
                    f"{predicted_bubble(plan):.1%}",
                    f"{figures.bubble_fraction:.1%}",
                    f"{figures.overlapped_transfers}/{figures.transfers} ({figures.overlapped_seconds:.2f} s)",
                )
            )
    print("\n".join(aligned_columns(rows, right=(1, 2, 3, 4))))
    print(f"interleaved / one hTask: {speeds['solve'] / speeds['fuse']:.2f}x tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
