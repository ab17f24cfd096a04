"""`muxtune-bench`: MuxTune against what users run today, and MuxTune's ablations, side by side in
one run on this machine.

For each model and task count (4 and 8 LoRA tasks of mixed lengths and ranks, `bench_workload`)
the same global batches are trained in these ways, each in processes of its own:

- (a) MuxTune's plan (`muxtune-compile`, then `muxtune-run`);
- (b) transformers + peft, one task after another, batches padded to their longest sequence;
- (c) transformers + peft, one process per task, all at once (peak memory summed);
- (d) an mLoRA-style mixed batch: every task's batch in one padded batch through one model
  holding every adapter, each adapter applied to its own task's rows (`bench_mixed`);
- (e) MuxTune with fusion (`--no-fuse`), chunk alignment (`--no-align`) and temporal
  interleaving turned off in turn; a row whose plan or program equals (a)'s is not run again.

Reported per row: effective (non-padding) tokens/s over training time, model FLOP utilization
(4 x parameters x non-padding tokens against the bf16 matmul peak measured once per run on the
rows' device, `bench_mfu`), whole-job wall time (MuxTune's includes compiling and process
start-up), peak memory (CUDA's peak allocated on a GPU, else peak RSS), and ratios against (b)
and (c); then whether the targets are met: throughput >= 2.5x (b), peak memory >= 3x (4 tasks)
and >= 5x (8 tasks) lower than (c), MFU of (a) >= 50%. With ``--repeat N`` the rows run N times
in turn (a, b, ..., a, b, ...), each row reports its median run, and the (a) / (b) ratio of every
repetition is listed: on a noisy machine the speed drifts by more than the differences measured.
``--record`` appends a dated section to BENCHMARKS.md (``--record-file``).

    muxtune-bench [--model builtin:smollm2-135m --model layers=8] [--tasks 4 --tasks 8] [--steps 4]
                  [--rows a,b,c,d,e-fuse,e-align,e-interleave] [--repeat N] [--dtype bf16]
                  [--peak-tflops X] [--record [--record-file FILE]] [key=value ...]

The GPU whole-job benchmark (a LLaMA-architecture 1.07B model with random weights, 8 tasks):

    muxtune-bench --model random:llama-1b --tasks 8 --steps 100 --rows a,b --record
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from muxtune.common.allocator import restart_with_allocator
from muxtune.common.cli import run_command

from .bench_mfu import PeakFlops, bench_device, peak_in_subprocess
from .bench_models import RANDOM_MODELS, RANDOM_PREFIX, flop_parameters
from .bench_report import (
    ROW_LABELS,
    ROWS,
    ConfigResult,
    append_record,
    record_section,
    render_text,
)
from .bench_rows import BenchFailure, ConfigurationRun
from .bench_workload import BenchError, resolve_bench_model, workload, write_job

PROG = "muxtune-bench"
DEFAULT_MODELS = ("builtin:smollm2-135m", "layers=8")
DEFAULT_TASKS = (4, 8)
DEFAULT_STEPS = 4
PEFT_ROWS = ("b", "c", "d")
"""The rows that run transformers + peft."""
RUN_ORDER = ("a", "e-fuse", "e-align", "e-interleave", "b", "c", "d")
"""(a) first: the ablations compare their plans with its plan."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        help="builtin:NAME, a model directory, layers=N (the first N layers of SmolLM2-135M) or "
        f"{' / '.join(RANDOM_PREFIX + n for n in RANDOM_MODELS)} (LLaMA, random bf16 weights); "
        f"repeat for several (default: {' and '.join(DEFAULT_MODELS)})",
    )
    parser.add_argument(
        "--tasks",
        action="append",
        type=int,
        help=f"number of tasks (1-8); repeat for several (default: {' and '.join(map(str, DEFAULT_TASKS))})",
    )
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps per task (default {DEFAULT_STEPS})"
    )
    parser.add_argument(
        "--rows", default=",".join(ROWS), help=f"comma-separated rows to run (default all: {','.join(ROWS)})"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the rows this many times, in turn, and report each row's median run (default 1)",
    )
    parser.add_argument(
        "--dtype", default="bf16", choices=("fp32", "bf16", "fp16"), help="backbone dtype (default bf16)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        metavar="X",
        help="the device's bf16 peak for MFU, in TFLOP/s (default: measured once at the start of the run)",
    )
    parser.add_argument(
        "--record", action="store_true", help="append a dated section (command, machine, tables) to --record-file"
    )
    parser.add_argument(
        "--record-file",
        type=Path,
        default=Path("BENCHMARKS.md"),
        metavar="FILE",
        help="where --record appends (default BENCHMARKS.md in the current folder)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="job spec overrides, e.g. tasks.*.batch_size=2"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def parse_rows(text: str) -> tuple[str, ...]:
    """The rows named in ``text`` (comma-separated)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ROW_LABELS]
    if unknown or not names:
        named = f"unknown row(s) {', '.join(map(repr, unknown))}" if unknown else "names no row"
        raise BenchError(f"--rows: {named}; choose from {', '.join(ROWS)}")
    return tuple(names)


@dataclass(frozen=True)
class BenchOptions:
    """What to run: models (`resolve_bench_model` values), task counts, rows, steps per task,
    backbone dtype, job spec overrides, repetitions and the bf16 peak MFU is counted against
    (TFLOP/s; None: measured)."""

    models: tuple[str, ...] = DEFAULT_MODELS
    task_counts: tuple[int, ...] = DEFAULT_TASKS
    rows: tuple[str, ...] = ROWS
    steps: int = DEFAULT_STEPS
    dtype: str = "bf16"
    overrides: tuple[str, ...] = ()
    repeat: int = 1
    peak_tflops: float | None = None


class Peaks:
    """The bf16 peak of each device, measured the first time it is asked for (or given)."""

    def __init__(self, given_tflops: float | None, progress: TextIO) -> None:
        self.given, self.progress = given_tflops, progress
        self.measured: dict[str, PeakFlops] = {}

    def __call__(self, device: str) -> PeakFlops:
        if self.given is not None:
            return PeakFlops(self.given * 1e12, 0, f"{device}, given by --peak-tflops")
        if device not in self.measured:
            try:
                self.measured[device] = peak_in_subprocess(device)
            except RuntimeError as exc:
                raise BenchFailure(str(exc)) from None
            print(f"bf16 peak: {self.measured[device].describe()}", file=self.progress)
        return self.measured[device]


def run_configuration(
    model: str, label: str, num_tasks: int, options: BenchOptions, scratch: Path, progress: TextIO, peaks: Peaks
) -> ConfigResult:
    """Every requested row of one (model, task count), in `RUN_ORDER`, ``options.repeat`` times
    in turn (a row that is not measured runs once); each row's median run is its result."""
    from muxtune.runtime.model_sources import resolve_model_dir

    work = Path(tempfile.mkdtemp(prefix=f"{num_tasks}-tasks-", dir=scratch))
    job = work / "job.yaml"
    spec = write_job(job, model, options.dtype, workload(num_tasks), options.steps, options.overrides)
    device = bench_device(spec.cluster.device)
    counted = flop_parameters(resolve_model_dir(spec.model))
    config = ConfigResult(label, spec, device=device, flop_parameters=counted, peak=peaks(device))
    run = ConfigurationRun(job, spec, work, device)
    for repetition in range(1, options.repeat + 1):
        for key in (k for k in RUN_ORDER if k in options.rows):
            if key in config.runs and not config.runs[key][0].measured:
                continue
            started = time.perf_counter()
            result = run.row(key)
            config.runs.setdefault(key, []).append(result)
            done = f"{result.tokens_per_second:,.1f} tokens/s" if result.measured else result.note
            which = f" (run {repetition} of {options.repeat})" if options.repeat > 1 else ""
            seconds = time.perf_counter() - started
            print(f"[{config.title}] {ROW_LABELS[key]}{which}: {done} ({seconds:.0f} s)", file=progress)
    return config


def run_benchmark(options: BenchOptions, progress: TextIO = sys.stderr) -> list[ConfigResult]:
    """Every configuration (model x task count) of ``options``; a line per row to ``progress``.
    Raises `BenchError` for a bad option, `BenchFailure` when a row's process fails."""
    if options.steps < 1:
        raise BenchError(f"--steps: must be a positive integer, got {options.steps}")
    if options.repeat < 1:
        raise BenchError(f"--repeat: must be a positive integer, got {options.repeat}")
    if options.peak_tflops is not None and not options.peak_tflops > 0:
        raise BenchError(f"--peak-tflops: must be a positive number, got {options.peak_tflops}")
    baselines = [row for row in options.rows if row in PEFT_ROWS]
    if baselines and importlib.util.find_spec("peft") is None:
        raise BenchError(f"--rows: {', '.join(baselines)} need peft (pip install peft), which is not installed")
    for count in options.task_counts:
        workload(count)
    configs = []
    peaks = Peaks(options.peak_tflops, progress)
    with tempfile.TemporaryDirectory(prefix="muxtune-bench-") as name:
        scratch = Path(name)
        for model in options.models:
            spec_model, label = resolve_bench_model(model, scratch)
            for count in options.task_counts:
                configs.append(run_configuration(spec_model, label, count, options, scratch, progress, peaks))
    return configs


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        restart_with_allocator(PROG)  # every row's processes inherit it: one allocator for all
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    command = shlex.join([PROG, *(sys.argv[1:] if argv is None else argv)])

    def bench() -> int:
        options = BenchOptions(
            models=tuple(args.model or DEFAULT_MODELS),
            task_counts=tuple(args.tasks or DEFAULT_TASKS),
            rows=parse_rows(args.rows),
            steps=args.steps,
            dtype=args.dtype,
            overrides=tuple(args.overrides),
            repeat=args.repeat,
            peak_tflops=args.peak_tflops,
        )
        started = time.perf_counter()
        try:
            configs = run_benchmark(options)
        except BenchFailure as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 1
        seconds = time.perf_counter() - started
        print("\n\n".join(render_text(c) for c in configs))
        print(f"took {seconds / 60:.1f} min")
        if args.record:
            append_record(args.record_file, record_section(configs, command, seconds, datetime.date.today()))
            print(f"recorded in {args.record_file}")
        return 0

    return run_command(PROG, bench, args.debug)


if __name__ == "__main__":
    sys.exit(main())
