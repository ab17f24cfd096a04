"""Benchmark: MuxTune's fused multi-task run against transformers + peft, one task after another.

Both sides train the same tasks on the same global batches (the batch stream MuxTune's
manifest records) with the same optimizer and schedule definitions; the baseline pads each batch
to its longest sequence, as a HF Trainer run does. Each side runs in its own process so peak
memory is its own. Reported: effective (non-padding) tokens/s, padding share, peak RSS, ratios.

    python -m muxtune.tools.bench_vs_peft --steps 5 [--spec tools/data/quickstart.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from muxtune.common.memory import peak_resident_bytes
from muxtune.compiler.compile import compile_job
from muxtune.plans import load_plan, save_plan
from muxtune.runtime.executor import PlanExecutor
from muxtune.runtime.model_sources import resolve_model_dir
from muxtune.runtime.progress import ProgressDisplay
from muxtune.runtime.tokenizer import load_tokenizer
from muxtune.specs import load_job_spec

from .bench_hf import train_sequential

DEFAULT_SPEC = Path(__file__).resolve().parent / "data" / "quickstart.yaml"


def run_muxtune(plan_path: Path) -> dict:
    """The fused run, as `muxtune-run` does it (progress to a throwaway stream)."""
    plan = load_plan(plan_path)
    with open("/dev/null", "w") as sink:
        summary = PlanExecutor(plan, progress=ProgressDisplay([(t.name, t.steps) for t in plan.tasks], sink)).run()
    tokens = sum(t["tokens"] for t in summary["tasks"].values())
    return {
        "tokens": tokens,
        "seconds": summary["train_seconds"],
        "padded_tokens": tokens,
        "peak_rss_bytes": peak_resident_bytes(),
    }


def run_transformers_peft(plan_path: Path) -> dict:
    """Each task alone in transformers + peft, one after another, on the same batches."""
    plan = load_plan(plan_path)
    model_dir = resolve_model_dir(plan.job.model)
    result = train_sequential(model_dir, plan.job.dtype, plan.tasks, load_tokenizer(model_dir))
    return {
        "tokens": result.tokens,
        "seconds": result.train_seconds,
        "padded_tokens": result.padded_tokens,
        "peak_rss_bytes": peak_resident_bytes(),
    }


SIDES = {"muxtune": run_muxtune, "transformers_peft": run_transformers_peft}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muxtune.tools.bench_vs_peft", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per task")
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    if args.side:
        print(json.dumps(SIDES[args.side](args.plan)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"output_dir={tmp}/out",
            f"tasks.*.steps={args.steps}",
            "tasks.*.schedule.warmup_steps=0",
            *args.overrides,
        ]
        plan_path = save_plan(compile_job(load_job_spec(args.spec, overrides)).plan, Path(tmp) / "plan.yaml")
        results = {}
        for side in ("transformers_peft", "muxtune"):
            out = subprocess.run(
                [sys.executable, "-m", "muxtune.tools.bench_vs_peft", "--side", side, "--plan", str(plan_path)],
                capture_output=True,
                text=True,
                check=True,
            )
            results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    for side, r in results.items():
        r["tokens_per_second"] = r["tokens"] / r["seconds"]
        r["padding_share"] = 1 - r["tokens"] / r["padded_tokens"]
        print(
            f"{side:18s} {r['tokens_per_second']:8.1f} tokens/s  {r['tokens']} tokens in {r['seconds']:.1f} s  "
            f"padding {100 * r['padding_share']:.1f}%  peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB"
        )
    base, ours = results["transformers_peft"], results["muxtune"]
    print(
        f"speedup {ours['tokens_per_second'] / base['tokens_per_second']:.2f}x, "
        f"peak memory ratio {ours['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
