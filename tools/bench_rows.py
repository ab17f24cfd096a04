"""Running the rows of one `muxtune-bench` configuration, each in processes of its own so that
peak memory is its own: MuxTune as a user runs it (`muxtune-compile`, then `muxtune-run`), the
transformers + peft baselines (`bench_hf`), and the ablations, which are not run when their
plan or program is the same as (a)'s (the row says so)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from muxtune.plans import Free, Plan, load_plan
from muxtune.specs import JobSpec

from .bench_report import RowResult

MUXTUNE_ROWS = {"a": (), "e-fuse": ("--no-fuse",), "e-align": ("--no-align",), "e-interleave": ("--streams", "1")}
"""The MuxTune rows and the `muxtune-compile` switches each is compiled with."""


class BenchFailure(RuntimeError):
    """A row's process failed; the message names the row and ends with its error output."""


@dataclass(frozen=True)
class Finished:
    """One process that ran to its end: exit status, output and peak resident set size."""

    command: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    peak_rss_bytes: int


def bench_env() -> dict[str, str]:
    """The environment of every row's process: offline hub, quiet transformers."""
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **os.environ}


def run_processes(commands: Sequence[Sequence[str]]) -> tuple[list[Finished], float]:
    """Start every command at once and wait for all of them: each one's result (its own peak RSS
    from `os.wait4`) and the wall seconds until the last one exited."""
    started = time.perf_counter()
    with ExitStack() as stack:
        files = [
            (stack.enter_context(tempfile.TemporaryFile("w+")), stack.enter_context(tempfile.TemporaryFile("w+")))
            for _ in commands
        ]
        processes = [
            subprocess.Popen(list(c), stdout=out, stderr=err, text=True, env=bench_env())
            for c, (out, err) in zip(commands, files)
        ]
        finished = []
        for process, (out, err) in zip(processes, files):
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            finished.append(
                Finished(tuple(process.args), process.returncode, out.read(), err.read(), usage.ru_maxrss * 1024)
            )
    return finished, time.perf_counter() - started


def checked(row: str, finished: Sequence[Finished]) -> list[Finished]:
    """``finished`` when every process exited 0, else `BenchFailure` with the first failure's error output."""
    for f in finished:
        if f.returncode != 0:
            tail = "\n".join(f.stderr.strip().splitlines()[-15:])
            raise BenchFailure(f"row ({row}): `{' '.join(f.command)}` exited with {f.returncode}:\n{tail}")
    return list(finished)


def htasks_overlap(plan: Plan) -> bool:
    """Whether any rank's round holds micro-batches of two hTasks in flight at once (a micro-batch
    is in flight from its first instruction to its `Free`): only then does running each hTask's
    micro-batches as their own pipeline schedule, with a flush before the next, change the program."""
    for program in plan.programs:
        for body in program.phases:
            in_flight: set[tuple[int, int]] = set()
            for instruction in body:
                htask, microbatch = getattr(instruction, "htask", None), getattr(instruction, "microbatch", None)
                if htask is None or microbatch is None:
                    continue
                if isinstance(instruction, Free):
                    in_flight.discard((htask, microbatch))
                    continue
                if any(h != htask for h, _ in in_flight):
                    return True
                in_flight.add((htask, microbatch))
    return False


def htasks_side_by_side(plan: Plan) -> bool:
    """Whether any round body runs hTasks on several streams (side by side on one device)."""
    return any(getattr(i, "stream", 0) for program in plan.programs for body in program.phases for i in body)


def same_plan(plan: Plan, reference: Plan) -> bool:
    """Whether two plans run the same phases with the same programs."""
    return plan.phases == reference.phases and plan.programs == reference.programs


def same_plan_note(key: str, reference: Plan) -> str:
    """Why ablation ``key`` compiled to (a)'s plan, when the reference plan shows it."""
    if key == "e-align" and reference.alignment.chunk_size == 1:
        return "same plan as (a): the device's chunk size is 1, so no budget was rounded up"
    if key == "e-fuse" and all(len(h.tasks) == 1 for phase in reference.phases for h in phase.htasks):
        return "same plan as (a): the planner already runs one hTask per task"
    return "same plan as (a)"


class ConfigurationRun:
    """The rows of one configuration: the job spec at ``job`` (already resolved), scratch space
    in ``work``, the device the rows train on (``cpu`` or ``cuda``: there each row's peak memory is
    its CUDA peak); `row` runs one row and returns its result."""

    def __init__(self, job: Path, spec: JobSpec, work: Path, device: str = "cpu") -> None:
        self.job, self.spec, self.work, self.device = job, spec, work, device
        self.compiled: Counter[str] = Counter()
        self.python = sys.executable
        self.reference: Plan | None = None

    def row(self, key: str) -> RowResult:
        """Run row ``key`` (one of `bench_report.ROWS`)."""
        if key == "e-interleave":
            return self.interleave_off()
        if key in MUXTUNE_ROWS:
            return self.muxtune(key)
        if key == "c":
            return self.concurrent()
        side = {"b": "sequential", "d": "mixed"}[key]
        return self.baseline(key, [self._side_command(side)], concurrent=False)

    def _compile(self, key: str) -> tuple[Path, Finished, float]:
        self.compiled[key] += 1
        runs = self.compiled[key]
        folder = self.work / (key if runs == 1 else f"{key}-{runs}")  # a repeated row gets its own
        plan = folder / "plan.yaml"
        command = [self.python, "-m", "muxtune.compiler.cli", str(self.job), "-o", str(plan), *MUXTUNE_ROWS[key]]
        finished, seconds = run_processes([[*command, f"output_dir={folder / 'out'}"]])
        return plan, checked(key, finished)[0], seconds

    def reference_plan(self) -> Plan:
        """(a)'s plan: the one row (a) compiled, or compiled now when (a) is not a row."""
        if self.reference is None:
            self.reference = load_plan(self._compile("a")[0])
        return self.reference

    def muxtune(self, key: str) -> RowResult:
        """Compile and run as a user does; the ablations are not run when their plan is (a)'s."""
        plan_path, compiled, compile_seconds = self._compile(key)
        plan = load_plan(plan_path)
        if key == "a":
            self.reference = plan
        elif same_plan(plan, self.reference_plan()):
            return RowResult(key, measured=False, note=same_plan_note(key, self.reference_plan()))
        finished, run_seconds = run_processes([[self.python, "-m", "muxtune.runtime.cli", str(plan_path)]])
        ran = checked(key, finished)[0]
        summary = json.loads((Path(plan.job.output_dir) / "summary.json").read_text())
        return RowResult(
            key,
            tokens=sum(t["tokens"] for t in summary["tasks"].values()),
            padded_tokens=sum(t["tokens"] for t in summary["tasks"].values()),
            train_seconds=summary["train_seconds"],
            wall_seconds=compile_seconds + run_seconds,
            process_peak_rss=(compiled.peak_rss_bytes, ran.peak_rss_bytes),
            process_peak_gpu=(summary["peak_memory_bytes"],) if self.device == "cuda" else (),
        )

    def interleave_off(self) -> RowResult:
        """Interleaving off: (a)'s hTasks one after another on stream 0 (`--streams 1`) where
        (a) runs them side by side; otherwise the same program as (a) unless (a)'s program has
        micro-batches of two hTasks in flight at once, which needs a pipeline of several stages."""
        if htasks_side_by_side(self.reference_plan()):
            return self.muxtune("e-interleave")
        if htasks_overlap(self.reference_plan()):
            return RowResult(
                "e-interleave", measured=False, note="not run: the compiler has no switch to turn interleaving off"
            )
        return RowResult(
            "e-interleave",
            measured=False,
            note="same program as (a) on one device: no two hTasks' micro-batches are ever in flight at once",
        )

    def _side_command(self, side: str, *extra: str) -> list[str]:
        return [self.python, "-m", "muxtune.tools.bench_hf", side, str(self.job), *extra]

    def concurrent(self) -> RowResult:
        """One process per task, all at once, the cores shared between them."""
        threads = str(max(1, (os.cpu_count() or 1) // len(self.spec.tasks)))
        commands = [self._side_command("task", "--task", t.name, "--threads", threads) for t in self.spec.tasks]
        return self.baseline("c", commands, concurrent=True)

    def baseline(self, key: str, commands: Sequence[Sequence[str]], concurrent: bool) -> RowResult:
        """A transformers + peft row: its processes' results added up; for processes that ran at
        once, training time runs from the first start to the last end."""
        finished, wall = run_processes(commands)
        sides = [json.loads(f.stdout.strip().splitlines()[-1]) for f in checked(key, finished)]
        if concurrent:
            train = max(s["train_end"] for s in sides) - min(s["train_start"] for s in sides)
        else:
            train = sum(s["train_seconds"] for s in sides)
        return RowResult(
            key,
            tokens=sum(s["tokens"] for s in sides),
            padded_tokens=sum(s["padded_tokens"] for s in sides),
            train_seconds=train,
            wall_seconds=wall,
            process_peak_rss=tuple(f.peak_rss_bytes for f in finished),
            process_peak_gpu=tuple(s["peak_gpu_bytes"] for s in sides) if self.device == "cuda" else (),
            concurrent=concurrent,
        )
