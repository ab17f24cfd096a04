"""`muxtune-bench-kernels`: the segmented multi-task LoRA kernels against a per-task loop of
torch matmuls and a padded batched matmul, across task counts, ranks and segment sizes.

Implementations (`bench_kernels_cases`), each timed forward (autograd recording, as in training)
and forward+backward (gradients of x, every A_p and every B_p):

- segmented: `muxtune.kernels.segmented_lora` (the dispatcher's backend: Triton on CUDA);
- loop: per task, ``y[seg] += s_p * (x[seg] @ A_p^T) @ B_p^T`` with torch matmuls;
- padded: rows padded to (P, longest segment, D), ranks to the largest, one `torch.bmm` pair;
- grouped_mm: `torch._grouped_mm` over the unpadded rows (ranks padded), where it applies.

Each case first checks every implementation's output and gradients against the loop's; a
failed check marks the row and makes the command exit 1.

Counts (real rows n_p and ranks r_p only; padding is not useful work):
forward FLOPs = sum_p 2 n_p r_p (D + O); backward = dh (2nrO) + dx (2nrD) + dA (2nrD) + dB (2nrO)
= 2x forward, so forward+backward = 3x forward. Bytes follow the kernels' passes (element size
e, H = sum_p n_p r_p, W = sum_p r_p (D + O)): forward e (TD + 2H + W + 2TO); backward
e (2TO + 2TD + 4H + 2W). Ceilings are measured at start: a large square matmul in the dtype
(FLOP/s) and a large tensor copy (bytes read + written per second). Times are medians of
``--repeat`` runs after ``--warmup`` (CUDA events on CUDA, perf_counter on CPU).

    muxtune-bench-kernels [--quick] [--device auto|cpu|cuda] [--tasks 1,4,8,16,32] [--ranks mixed,16]
                          [--dist uniform,skewed] [--tokens 8192] [--dims 2048x2048] [--dtype bf16]
                          [--repeat N] [--warmup N] [--no-backward] [--json PATH] [--record FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from muxtune.common.cli import console_entry, run_command
from muxtune.common.errors import UserError
from muxtune.common.files import atomic_write_text
from muxtune.common.text import aligned_columns
from muxtune.kernels import chosen_backend

from .bench_kernels_cases import (
    IMPLS,
    RUNNERS,
    CaseSpec,
    check_against,
    forward_backward,
    grouped_mm_unavailable,
    make_case,
    make_tensors,
)
from .bench_report import append_record, describe_cpu, package_version

PROG = "muxtune-bench-kernels"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "fwd+bwd")


class KernelBenchError(UserError):
    """A bad option of `muxtune-bench-kernels`."""


@dataclass(frozen=True)
class Settings:
    """Defaults of one kind of run: grid, repetitions and ceiling sizes."""

    tasks: str
    ranks: str
    dist: str
    tokens: str
    dims: str
    warmup: int
    repeat: int
    matmul_n: int
    copy_mib: int


CUDA_SETTINGS = Settings("1,4,8,16,32", "mixed,16", "uniform,skewed", "8192", "2048x2048", 3, 10, 8192, 1024)
CPU_SETTINGS = Settings("1,4,8,16,32", "mixed,16", "uniform,skewed", "2048", "1024x1024", 1, 3, 1024, 64)
QUICK_SETTINGS = Settings("1,4", "mixed", "uniform,skewed", "256", "128x128", 1, 2, 256, 8)


def build_parser() -> argparse.ArgumentParser:
    """The command line (list options are parsed later, so that errors exit 2 naming them)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="a few small cases (seconds on a CPU); other options still apply")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto: cuda when available")
    add("--tasks", help="comma-separated task counts (default 1,4,8,16,32)")
    add("--ranks", help="comma-separated: 'mixed' (each task's rank drawn from 4..64) or a rank for every task")
    add("--dist", help="comma-separated segment size distributions: uniform, skewed (default both)")
    add("--tokens", help="comma-separated total tokens T (default 8192 on CUDA, 2048 on CPU)")
    add("--dims", help="comma-separated DxO feature sizes (default 2048x2048 on CUDA, 1024x1024 on CPU)")
    add("--dtype", default="bf16", choices=tuple(DTYPES), help="compute dtype (default bf16)")
    add("--repeat", type=int, help="timed runs per measurement; the median is reported")
    add("--warmup", type=int, help="untimed runs before each measurement")
    add("--backward", action=argparse.BooleanOptionalAction, default=True, help="also time forward+backward")
    add("--seed", type=int, default=0, help="seed of the drawn ranks, sizes and values (default 0)")
    add("--json", type=Path, metavar="PATH", help="write every result as JSON")
    add("--record", type=Path, metavar="FILE", help="append a dated markdown section (e.g. BENCHMARKS.md)")
    add("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def parse_list(option: str, text: str, parse: Callable[[str], object]) -> list:
    """The comma-separated items of ``text``, each through ``parse`` (a ValueError names ``option``)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise KernelBenchError(f"{option}: names nothing")
    try:
        return [parse(item) for item in items]
    except ValueError as exc:
        raise KernelBenchError(f"{option}: {exc}") from None


def positive(item: str) -> int:
    """``item`` as an integer >= 1."""
    value = int(item) if item.isdigit() else -1
    if value < 1:
        raise ValueError(f"{item!r} is not a positive integer")
    return value


def rank_mode(item: str) -> str:
    """Either mixed or a positive rank, as text."""
    return item if item == "mixed" else str(positive(item))


def distribution(item: str) -> str:
    """A segment size distribution name."""
    if item not in ("uniform", "skewed"):
        raise ValueError(f"unknown distribution {item!r}; choose from uniform, skewed")
    return item


def dims(item: str) -> tuple[int, int]:
    """``DxO`` as (D, O)."""
    parts = item.lower().split("x")
    if len(parts) != 2:
        raise ValueError(f"{item!r} is not DxO, e.g. 2048x2048")
    return positive(parts[0]), positive(parts[1])


def resolve_device(choice: str) -> torch.device:
    """The device of ``--device`` (auto: cuda when torch sees one)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise KernelBenchError("--device: cuda asked for, but torch sees no CUDA device")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def make_timer(device: torch.device, warmup: int, repeat: int) -> Callable[[Callable[[], object]], float]:
    """A function timing a callable: median milliseconds of ``repeat`` runs after ``warmup``."""

    def timed(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                started = time.perf_counter()
                fn()
                times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)

    return timed


def measure_ceilings(device: torch.device, dtype: torch.dtype, settings: Settings, timed: Callable) -> dict:
    """Matmul FLOP/s of an n x n x n product in ``dtype`` and copy bandwidth (read + write) in bytes/s."""
    n = settings.matmul_n
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    matmul_ms = timed(lambda: a @ b)
    src = torch.empty(settings.copy_mib * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    copy_ms = timed(lambda: dst.copy_(src))
    return {
        "matmul_n": n,
        "matmul_flops": 2 * n**3 / (matmul_ms / 1e3),
        "copy_bytes": 2 * src.numel(),
        "bandwidth": 2 * src.numel() / (copy_ms / 1e3),
    }


def run_case(spec: CaseSpec, dtype: torch.dtype, device: torch.device, args: argparse.Namespace, timed) -> dict:
    """Check every implementation against the loop, then time each; a JSON-ready result."""
    tensors = make_tensors(spec, dtype, device, args.seed)
    reference = forward_backward(tensors, RUNNERS["loop"])
    grouped_reason = grouped_mm_unavailable(device, dtype)
    results = {}
    for impl in IMPLS:
        result: dict = {"check": "reference" if impl == "loop" else "passed"}
        results[impl] = result
        if impl == "grouped_mm" and grouped_reason:
            result["check"] = f"n/a: {grouped_reason}"
            continue
        run = RUNNERS[impl]
        try:
            got = forward_backward(tensors, run)
        except (RuntimeError, NotImplementedError) as exc:
            if impl != "grouped_mm":
                raise
            result["check"] = f"n/a: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            continue
        if impl != "loop":
            try:
                check_against(reference, got, dtype)
            except AssertionError as exc:
                result["check"] = f"FAILED: {' '.join(str(exc).split())[:300]}"
        del got
        result["fwd_ms"] = timed(lambda: run(tensors))
        if args.backward:
            result["fwd+bwd_ms"] = timed(lambda: forward_backward(tensors, run))
    elem = torch.empty((), dtype=dtype).element_size()
    flops = {"fwd": spec.forward_flops(), "fwd+bwd": spec.forward_flops() + spec.backward_flops()}
    moved = {"fwd": spec.forward_bytes(elem), "fwd+bwd": spec.forward_bytes(elem) + spec.backward_bytes(elem)}
    return {**asdict(spec), "label": spec.label, "flops": flops, "bytes": moved, "results": results}


def table_rows(cases: list[dict], mode: str, ceilings: dict) -> list[list[str]]:
    """Header and one row per (case, implementation) of one mode."""
    rows = [["case", "impl", "ms", "GFLOP/s", "%mm", "GB/s", "%bw", "vs loop", "vs padded", "check"]]
    for case in cases:
        results = case["results"]
        for impl, result in results.items():
            ms = result.get(f"{mode}_ms")
            if ms is None:
                rows.append([case["label"], impl, "-", "-", "-", "-", "-", "-", "-", result["check"]])
                continue
            flops, moved = case["flops"][mode] / (ms / 1e3), case["bytes"][mode] / (ms / 1e3)
            ratios = [results[other].get(f"{mode}_ms") for other in ("loop", "padded")]
            rows.append(
                [
                    case["label"],
                    impl,
                    f"{ms:.3f}",
                    f"{flops / 1e9:,.1f}",
                    f"{100 * flops / ceilings['matmul_flops']:.1f}",
                    f"{moved / 1e9:,.1f}",
                    f"{100 * moved / ceilings['bandwidth']:.1f}",
                    *(f"{other / ms:.2f}x" if other else "-" for other in ratios),
                    result["check"],
                ]
            )
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    """`table_rows` as a markdown table."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]])


def machine(device: torch.device) -> str:
    """The CPU, the GPU used and the torch (and, on CUDA, triton) versions."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU used"
    versions = f"torch {torch.__version__}"
    if device.type == "cuda":
        versions += f", triton {package_version('triton')}"
    return f"{describe_cpu()}, {gpu}; {versions}"


def describe_ceilings(ceilings: dict) -> str:
    """The measured ceilings in one line."""
    return (
        f"matmul {ceilings['matmul_flops'] / 1e9:,.1f} GFLOP/s ({ceilings['matmul_n']}^3), "
        f"copy {ceilings['bandwidth'] / 1e9:,.1f} GB/s ({ceilings['copy_bytes'] / 2**20:,.0f} MiB read+written)"
    )


def record_section(report: dict, tables: dict[str, list[list[str]]]) -> str:
    """A dated BENCHMARKS.md section: command, machine, settings, ceilings and one table per mode."""
    settings = f"median of {report['repeat']} after {report['warmup']} warm-up runs"
    lines = [
        f"## {PROG}: segmented LoRA kernels against a torch loop and padded matmuls ({report['date']})",
        "",
        f"- Date: {report['date']}",
        f"- Machine: {report['machine']}",
        f"- Command: `{report['command']}`",
        f"- Device {report['device']}, dtype {report['dtype']}, segmented backend {report['backend']}; {settings}",
        f"- Ceilings: {describe_ceilings(report['ceilings'])}",
        "- Useful FLOPs and bytes count real rows and ranks only (see the module docstring); "
        "vs loop / vs padded: their time over this row's.",
    ]
    for mode, rows in tables.items():
        lines += ["", f"{mode}:", "", markdown_table(rows)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m muxtune.tools.bench_kernels " + shlex.join(sys.argv[1:] if argv is None else argv)

    def bench() -> int:
        device = resolve_device(args.device)
        dtype = DTYPES[args.dtype]
        settings = QUICK_SETTINGS if args.quick else CUDA_SETTINGS if device.type == "cuda" else CPU_SETTINGS
        tasks = parse_list("--tasks", args.tasks or settings.tasks, positive)
        ranks = parse_list("--ranks", args.ranks or settings.ranks, rank_mode)
        dists = parse_list("--dist", args.dist or settings.dist, distribution)
        tokens = parse_list("--tokens", args.tokens or settings.tokens, positive)
        shapes = parse_list("--dims", args.dims or settings.dims, dims)
        repeat = settings.repeat if args.repeat is None else args.repeat
        warmup = settings.warmup if args.warmup is None else args.warmup
        if repeat < 1:
            raise KernelBenchError(f"--repeat: must be a positive integer, got {repeat}")
        if warmup < 0:
            raise KernelBenchError(f"--warmup: must be >= 0, got {warmup}")
        if max(tasks) > min(tokens):
            raise KernelBenchError(f"--tasks: {max(tasks)} tasks need at least as many --tokens, got {min(tokens)}")
        timed = make_timer(device, warmup, repeat)
        backend = chosen_backend(torch.empty(0, device=device))
        started = time.perf_counter()
        ceilings = measure_ceilings(device, dtype, CUDA_SETTINGS if device.type == "cuda" else settings, timed)
        print(f"{PROG}: {device} {args.dtype}, segmented backend {backend}; {describe_ceilings(ceilings)}")
        grid = [(p, r, d, t, s) for t in tokens for s in shapes for d in dists for r in ranks for p in tasks]
        cases = []
        for i, (p, r, d, t, (d_in, d_out)) in enumerate(grid, 1):
            spec = make_case(p, r, d, t, d_in, d_out, args.seed)
            case_started = time.perf_counter()
            cases.append(run_case(spec, dtype, device, args, timed))
            took = time.perf_counter() - case_started
            detail = f"ranks={spec.ranks} rows={spec.sizes}"
            print(f"[{i}/{len(grid)}] {spec.label} {detail} ({took:.1f} s)", file=sys.stderr)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        seconds = time.perf_counter() - started
        modes = MODES if args.backward else MODES[:1]
        tables = {mode: table_rows(cases, mode, ceilings) for mode in modes}
        for mode, rows in tables.items():
            print(f"\n{mode}:")
            print("\n".join(aligned_columns(rows, right=range(2, 9), rule=True)))
        failed = [f"{c['label']} {impl}" for c in cases for impl, r in c["results"].items() if "FAILED" in r["check"]]
        print(f"took {seconds:.1f} s")
        report = {
            "command": command,
            "date": datetime.date.today().isoformat(),
            "machine": machine(device),
            "torch": torch.__version__,
            "device": str(device),
            "dtype": args.dtype,
            "backend": backend,
            "repeat": repeat,
            "warmup": warmup,
            "ceilings": ceilings,
            "cases": cases,
            "failed_checks": failed,
        }
        if args.json:
            atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
            print(f"wrote {args.json}")
        if args.record:
            append_record(args.record, record_section(report, tables))
            print(f"recorded in {args.record}")
        if failed:
            print(f"{PROG}: {len(failed)} check(s) failed: {'; '.join(failed)}", file=sys.stderr)
            return 1
        return 0

    return run_command(PROG, bench, args.debug)


entry = console_entry(main)


if __name__ == "__main__":
    entry()
