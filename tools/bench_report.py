"""What `muxtune-bench` measured, as tables for the terminal and a dated section of BENCHMARKS.md:
per row effective tokens/s, model FLOP utilization against the measured bf16 peak (`bench_mfu`),
whole-job wall time and peak memory (CUDA's peak allocated on a GPU, else peak RSS), the ratios
against the baselines (b) and (c), and whether the targets are met."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from muxtune.common.allocator import active_allocator
from muxtune.common.files import atomic_write_text
from muxtune.common.text import aligned_columns
from muxtune.specs import JobSpec

from .bench_mfu import FLOPS_PER_PARAMETER_TOKEN, PeakFlops, model_flop_utilization

ROW_LABELS = {
    "a": "(a) MuxTune",
    "b": "(b) transformers+peft, one task after another",
    "c": "(c) transformers+peft, one process per task",
    "d": "(d) mixed padded batch (mLoRA-style)",
    "e-fuse": "(e) MuxTune, fusion off",
    "e-align": "(e) MuxTune, alignment off",
    "e-interleave": "(e) MuxTune, interleaving off",
}
ROWS = tuple(ROW_LABELS)
TARGET_SPEEDUP = 2.5
"""Effective throughput of (a) against (b)."""
TARGET_MEMORY = {4: 3.0, 8: 5.0}
"""How many times less peak memory (a) needs than (c), by task count."""
TARGET_MFU = 0.5
"""Model FLOP utilization of (a) against the measured bf16 peak, on `TARGET_MFU_DEVICE`."""
TARGET_MFU_DEVICE = "cuda"
GIB = 2**30


@dataclass(frozen=True)
class RowResult:
    """One row: tokens (non-padding and padded), training seconds, whole-job wall seconds, each
    process's peak RSS and, on CUDA, each training process's peak CUDA memory allocated (summed
    when the processes ran at once, else the largest). A row that was not run says why in
    ``note`` (``measured`` false)."""

    row: str
    tokens: int = 0
    padded_tokens: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    process_peak_rss: tuple[int, ...] = ()
    process_peak_gpu: tuple[int, ...] = ()
    concurrent: bool = False
    measured: bool = True
    note: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds

    @property
    def peak_rss(self) -> int:
        return sum(self.process_peak_rss) if self.concurrent else max(self.process_peak_rss)

    @property
    def peak_memory(self) -> int:
        """The peak CUDA memory when measured (on CUDA), else the peak RSS."""
        if not self.process_peak_gpu:
            return self.peak_rss
        return sum(self.process_peak_gpu) if self.concurrent else max(self.process_peak_gpu)

    @property
    def padding(self) -> float:
        return 1 - self.tokens / self.padded_tokens


@dataclass(frozen=True)
class ConfigResult:
    """Every row of one (model, task count) configuration, the device the rows trained on, the
    parameters MFU counts (`bench_models.flop_parameters`) and the device's measured peak."""

    model: str
    spec: JobSpec
    runs: dict[str, list[RowResult]] = field(default_factory=dict)
    """Every run of each row, in order (one each unless the rows were repeated)."""
    device: str = "cpu"
    flop_parameters: int = 0
    peak: PeakFlops | None = None

    def mfu(self, row: RowResult) -> float | None:
        """The row's model FLOP utilization (None without a measured peak or parameter count)."""
        if self.peak is None or not self.flop_parameters or not row.measured:
            return None
        return model_flop_utilization(self.flop_parameters, row.tokens, row.train_seconds, self.peak.flops)

    def mfu_line(self) -> str | None:
        """How MFU is counted here, with the measured peak."""
        if self.peak is None or not self.flop_parameters:
            return None
        return (
            f"MFU = {FLOPS_PER_PARAMETER_TOKEN} x {self.flop_parameters:,} parameters (embeddings excluded, "
            f"output head included) x non-padding tokens / training seconds / bf16 peak {self.peak.describe()}; "
            "model FLOPs: the head counts for every token, also where a row computes logits only for scored tokens"
        )

    @property
    def rows(self) -> dict[str, RowResult]:
        """Each row's result: its median run (`median_run`)."""
        return {key: median_run(results) for key, results in self.runs.items()}

    @property
    def title(self) -> str:
        steps = max(t.steps for t in self.spec.tasks)
        return f"{self.model}, {len(self.spec.tasks)} tasks, {self.spec.dtype}, {steps} steps"

    def measured(self, row: str) -> RowResult | None:
        """The row when it was measured, else None."""
        result = self.rows.get(row)
        return result if result is not None and result.measured else None


def median_run(results: Sequence[RowResult]) -> RowResult:
    """The run with the median effective tokens/s (the slower middle one of an even count); the
    first when none was measured."""
    measured = sorted((r for r in results if r.measured), key=lambda r: r.tokens_per_second)
    return measured[(len(measured) - 1) // 2] if measured else results[0]


def paired_speedups(config: ConfigResult, row: str, against: str) -> list[float]:
    """``row`` over ``against`` per repetition (each pair ran one after the other)."""
    pairs = zip(config.runs.get(row, ()), config.runs.get(against, ()))
    return [a.tokens_per_second / b.tokens_per_second for a, b in pairs if a.measured and b.measured]


def speedup(config: ConfigResult, row: str, against: str) -> float | None:
    """Effective tokens/s of ``row`` over that of ``against`` (None unless both were measured)."""
    ours, theirs = config.measured(row), config.measured(against)
    return ours.tokens_per_second / theirs.tokens_per_second if ours and theirs else None


def memory_saving(config: ConfigResult, row: str, against: str) -> float | None:
    """How many times less peak memory ``row`` needs than ``against``."""
    ours, theirs = config.measured(row), config.measured(against)
    return theirs.peak_memory / ours.peak_memory if ours and theirs else None


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else ""


HEADER = (
    "row",
    "tokens",
    "padding",
    "tokens/s",
    "MFU",
    "vs (a)",
    "vs (b)",
    "vs (c)",
    "wall s",
    "peak RSS GiB",
    "mem (b)/row",
    "mem (c)/row",
    "note",
)
NUMERIC = range(1, len(HEADER) - 1)
MEMORY_COLUMN = HEADER.index("peak RSS GiB")


def header(config: ConfigResult) -> tuple[str, ...]:
    """`HEADER`, the memory column named for what it holds on the configuration's device."""
    if config.device != "cuda":
        return HEADER
    return (*HEADER[:MEMORY_COLUMN], "peak GPU GiB", *HEADER[MEMORY_COLUMN + 1 :])


def _percent(value: float | None) -> str:
    return f"{value:.1%}" if value is not None else ""


def table_rows(config: ConfigResult) -> list[tuple[str, ...]]:
    """The header and one row of cells per row of ``config``, in `ROWS` order."""
    cells = [header(config)]
    for key in ROWS:
        r = config.rows.get(key)
        if r is None:
            continue
        if not r.measured:
            cells.append((ROW_LABELS[key], *[""] * (len(HEADER) - 2), r.note))
            continue
        summed = "GPU memory summed" if r.process_peak_gpu else "RSS summed"
        processes = f"{len(r.process_peak_rss)} processes at once, {summed}" if r.concurrent else ""
        cells.append(
            (
                ROW_LABELS[key],
                f"{r.tokens:,}",
                f"{r.padding:.1%}",
                f"{r.tokens_per_second:,.1f}",
                _percent(config.mfu(r)),
                _ratio(speedup(config, key, "a")),
                _ratio(speedup(config, key, "b")),
                _ratio(speedup(config, key, "c")),
                f"{r.wall_seconds:.1f}",
                f"{r.peak_memory / GIB:.2f}",
                _ratio(memory_saving(config, key, "b")),
                _ratio(memory_saving(config, key, "c")),
                "; ".join(n for n in (processes, r.note) if n),
            )
        )
    return cells


def targets(config: ConfigResult) -> list[str]:
    """Each target that applies to ``config``, with its value and whether it is met."""
    lines = []
    value = speedup(config, "a", "b")
    if value is not None:
        verdict = "met" if value >= TARGET_SPEEDUP else "not met"
        lines.append(f"effective throughput (a) / (b): {value:.2f}x; target >= {TARGET_SPEEDUP}x: {verdict}")
    paired = paired_speedups(config, "a", "b")
    if len(paired) > 1:
        listed = ", ".join(f"{v:.2f}x" for v in paired)
        lines.append(
            f"(a) / (b) of each repetition: {listed} (median {statistics.median(paired):.2f}x); "
            "the table holds each row's median run"
        )
    goal = TARGET_MEMORY.get(len(config.spec.tasks))
    value = memory_saving(config, "a", "c")
    if value is not None and goal is not None:
        verdict = "met" if value >= goal else "not met"
        lines.append(
            f"peak memory (c) / (a): {value:.2f}x lower; target >= {goal:g}x lower with "
            f"{len(config.spec.tasks)} tasks: {verdict}"
        )
    ours = config.measured("a")
    value = config.mfu(ours) if ours else None
    if value is not None:
        goal = TARGET_MFU_DEVICE == config.device
        verdict = f"; goal on a GPU >= {TARGET_MFU:.0%}: {'met' if value >= TARGET_MFU else 'not met'}" if goal else ""
        lines.append(f"model FLOP utilization (a): {value:.1%}{verdict}")
    line = config.mfu_line()
    if line is not None:
        lines.append(line)
    counts = {r.tokens for r in config.rows.values() if r.measured}
    if len(counts) > 1:
        lines.append(f"warning: the rows trained different token counts ({', '.join(map(str, sorted(counts)))})")
    return lines


def render_text(config: ConfigResult) -> str:
    """The configuration's table and targets for the terminal."""
    lines = [config.title, *aligned_columns(table_rows(config), right=NUMERIC, rule=True)]
    return "\n".join(lines + [f"  {line}" for line in targets(config)])


def render_markdown(config: ConfigResult) -> str:
    """The configuration's markdown table and targets (for BENCHMARKS.md)."""
    cells = table_rows(config)
    align = ["---" if i not in NUMERIC else "---:" for i in range(len(HEADER))]
    lines = [f"### {config.title}", ""]
    lines += ["| " + " | ".join(row) + " |" for row in (cells[0], align, *cells[1:])]
    lines.append("")
    lines += [f"- {line}" for line in targets(config)]
    return "\n".join(lines)


def describe_tasks(spec: JobSpec) -> str:
    """One line per task of the workload: rank, targets, length cap and batch size."""
    return "; ".join(
        f"{t.name} (r{t.peft.r}, {len(t.peft.target_modules)} targets, <= {t.max_seq_len} tokens, batch {t.batch_size})"
        for t in spec.tasks
    )


def package_version(package: str) -> str:
    """The installed version of ``package``, or "not installed"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> str:
    """The CPU model (from /proc/cpuinfo), core count, memory, GPU and library versions."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    versions = ", ".join(f"{name} {package_version(name)}" for name in ("torch", "transformers", "peft"))
    return f"{describe_cpu()}, {gpu}; {versions}; malloc of every row: {active_allocator()}"


def describe_cpu() -> str:
    """The CPU model (from /proc/cpuinfo), core count and memory."""
    cpu = platform.processor() or platform.machine()
    memory = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f", {int(line.split()[1]) / 2**20:.0f} GiB"
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores{memory}"


def record_section(configs: Sequence[ConfigResult], command: str, seconds: float, date: datetime.date) -> str:
    """A dated BENCHMARKS.md section: command, machine, date, duration, workload and every table."""
    lines = [
        f"## muxtune-bench: MuxTune against transformers + peft baselines and ablations ({date.isoformat()})",
        "",
        f"- Date: {date.isoformat()}",
        f"- Machine: {machine()}",
        f"- Command: `{command}`",
        f"- Took: {seconds / 60:.1f} min for every row of every configuration",
    ]
    for spec in {len(c.spec.tasks): c.spec for c in configs}.values():
        lines.append(f"- Workload ({len(spec.tasks)} tasks): {describe_tasks(spec)}")
    lines += [
        "- Rows: effective (non-padding) tokens/s over training time; model FLOP utilization (MFU): "
        f"{FLOPS_PER_PARAMETER_TOKEN} x parameters (embeddings excluded, output head included: the frozen "
        "backbone's forward and activation gradients, no weight gradients) x non-padding tokens / training "
        "seconds / the bf16 matmul peak measured on the device at the start of the run; wall time of the whole "
        "job (for MuxTune compile and process start-up included); peak memory of the row's processes (summed "
        "for (c)): CUDA's peak allocated on a GPU, else peak RSS.",
        "",
    ]
    for config in configs:
        lines += [render_markdown(config), ""]
    return "\n".join(lines)


def append_record(path: Path, section: str) -> None:
    """Append ``section`` to the file at ``path`` (created when missing), after a blank line."""
    existing = path.read_text() if path.exists() else "# Benchmarks\n"
    atomic_write_text(path, existing.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n")
