"""`muxtune-quickstart`: the bundled four-task job on builtin:smollm2-135m, end to end.

Compiles `tools/data/quickstart.yaml`, runs the plan with a progress display, prints each
task's loss at start and end and its tokens/s, then one greedy generation per task on an
example the task never saw, before and after fine-tuning.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from muxtune.common.cli import run_command
from muxtune.compiler.compile import compile_job
from muxtune.plans import save_plan
from muxtune.runtime.adapters import load_adapter
from muxtune.runtime.backbone import greedy_generate, load_model
from muxtune.runtime.cli import format_summary
from muxtune.runtime.engine import MultiTaskEngine
from muxtune.runtime.executor import PlanExecutor
from muxtune.runtime.run_folder import is_muxtune_run
from muxtune.runtime.task_runs import task_training
from muxtune.specs import SpecError, load_job_spec

from .make_datasets import make_examples

PROG = "muxtune-quickstart"
SPEC = Path(__file__).resolve().parent / "data" / "quickstart.yaml"
UNSEEN_SEED = 12345


def fresh_output_dir(path: Path) -> None:
    """Clear a previous quickstart run (only a folder MuxTune made); refuse anything else."""
    if not path.exists():
        return
    if not is_muxtune_run(path):
        raise SpecError([f"output_dir: {path} exists and is not a MuxTune run; choose another --output-dir"])
    shutil.rmtree(path)


def show_generations(plan, max_new_tokens: int = 24) -> None:
    """One unseen example per task: expected answer, base model, adapted model."""
    loaded = load_model(plan.job.model, plan.job.dtype)
    engine = MultiTaskEngine(loaded.model)
    for task in plan.tasks:
        _, state = load_adapter(Path(plan.job.output_dir) / task.name)
        engine.add_task(task_training(task), init_state=state)
    for task in plan.tasks:
        example = make_examples(task.name, UNSEEN_SEED, 1)[0]
        prompt = example["prompt"]
        tail = prompt.splitlines()[-2:] if "\n" in prompt else [prompt]
        base = greedy_generate(loaded, prompt, max_new_tokens=max_new_tokens)
        tuned = greedy_generate(loaded, prompt, task=task.name, max_new_tokens=max_new_tokens)
        print(f"\n[{task.name}] ...{' / '.join(line.strip()[-70:] for line in tail)}")
        print(f"  expected: {example['completion'].strip()[:80]}")
        print(f"  base:     {base.strip()[:80]!r}")
        print(f"  adapted:  {tuned.strip()[:80]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Fine-tune four tasks at once on SmolLM2-135M (CPU).")
    parser.add_argument("--output-dir", default="runs/quickstart", help="where the run goes (default runs/quickstart)")
    parser.add_argument("--fast", action="store_true", help="two steps per task (a smoke test)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="spec overrides, e.g. tasks.*.steps=10")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = parser.parse_intermixed_args(argv)

    def quickstart() -> int:
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
        fresh_output_dir(output_dir)
        plan_path = save_plan(result.plan, output_dir.with_name(output_dir.name + ".plan.yaml"))
        print(f"plan: {plan_path} ({len(result.plan.tasks)} tasks, {len(result.plan.phases)} phase(s))")
        summary = PlanExecutor(result.plan).run()
        print(format_summary(summary))
        show_generations(result.plan)
        print(f"\nadapters, metrics and checkpoints in {output_dir}")
        return 0

    return run_command(PROG, quickstart, args.debug)


if __name__ == "__main__":
    sys.exit(main())
