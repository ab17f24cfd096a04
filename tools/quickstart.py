"""`muxtune-quickstart`: the bundled four-task job on builtin:smollm2-135m, end to end.

Compiles `tools/data/quickstart.yaml`, runs the plan with a progress display, prints each
task's loss at start and end and its tokens/s, then scores every task on held-out examples it
never trained on (exact match of greedy answers, base model against adapted model; see
`heldout_eval`) and shows one of them per task.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from muxtune.common.allocator import restart_with_allocator
from muxtune.common.cli import console_entry, run_command
from muxtune.compiler.compile import compile_job
from muxtune.plans import save_plan
from muxtune.runtime.executor import PlanExecutor
from muxtune.runtime.run_folder import is_muxtune_run
from muxtune.runtime.summary_text import format_summary
from muxtune.specs import SpecError, load_job_spec

from .heldout_eval import DEFAULT_EXAMPLES, evaluate_plan, format_accuracy_table, format_examples, heldout_sets

PROG = "muxtune-quickstart"
SPEC = Path(__file__).resolve().parent / "data" / "quickstart.yaml"


def fresh_output_dir(path: Path) -> None:
    """Clear a previous quickstart run (only a folder MuxTune made); refuse anything else."""
    if not path.exists():
        return
    if not is_muxtune_run(path):
        raise SpecError([f"output_dir: {path} exists and is not a MuxTune run; choose another --output-dir"])
    shutil.rmtree(path)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        restart_with_allocator(PROG)
    parser = argparse.ArgumentParser(prog=PROG, description="Fine-tune four tasks at once on SmolLM2-135M (CPU).")
    parser.add_argument("--output-dir", default="runs/quickstart", help="where the run goes (default runs/quickstart)")
    parser.add_argument("--fast", action="store_true", help="two steps per task (a smoke test)")
    parser.add_argument(
        "--eval-examples",
        type=int,
        default=DEFAULT_EXAMPLES,
        metavar="N",
        help=f"held-out examples scored per task, base and adapted (default {DEFAULT_EXAMPLES}; 0: no evaluation)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="spec overrides, e.g. tasks.*.steps=10")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = parser.parse_intermixed_args(argv)

    def quickstart() -> int:
        if args.eval_examples < 0:
            raise SpecError([f"--eval-examples: must be 0 or more, got {args.eval_examples}"])
        output_dir = Path(args.output_dir).resolve()
        overrides = [
            f"output_dir={output_dir}",
            *(["tasks.*.steps=2", "tasks.*.schedule.warmup_steps=0"] if args.fast else []),
            *args.overrides,
        ]
        spec = load_job_spec(SPEC, overrides)
        result = compile_job(spec, spec_path=str(SPEC))
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
        heldout = heldout_sets(result.plan, args.eval_examples) if args.eval_examples else {}
        fresh_output_dir(output_dir)
        plan_path = save_plan(result.plan, output_dir.with_name(output_dir.name + ".plan.yaml"))
        print(f"plan: {plan_path} ({len(result.plan.tasks)} tasks, {len(result.plan.phases)} phase(s))")
        summary = PlanExecutor(result.plan).run()
        print(format_summary(summary))
        if heldout:
            print(f"\nscoring {args.eval_examples} held-out examples per task, base and adapted ...", flush=True)
            report = evaluate_plan(result.plan, heldout)
            print(format_accuracy_table(report, summary))
            print("\n" + format_examples(report))
        print(f"\nadapters, metrics and checkpoints in {output_dir}")
        return 0

    return run_command(PROG, quickstart, args.debug)


entry = console_entry(main)


if __name__ == "__main__":
    entry()
