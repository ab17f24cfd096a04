"""`muxtune-inspect plan.yaml [--json]`: describe a compiled plan file in readable tables.

Shows the job and its placement, the tasks, the phases and their hTasks, a summary of each
rank's program (instructions per opcode in each phase's round body), the compiler's
predictions and its solver report. ``--json`` prints the same content as one JSON object.
Reads the plan with `muxtune.plans` only, so it never imports torch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from muxtune.common.cli import console_entry, run_command
from muxtune.common.text import aligned_columns
from muxtune.plans import Instruction, Opcode, Plan, PlanError, RankProgram, load_plan
from muxtune.plans.stream_checks import htask_streams

PROG = "muxtune-inspect"
GIB = 2**30

Row = Sequence[str]


def read_plan(path: str) -> Plan:
    """The validated plan at ``path``; every validation problem names the file."""
    try:
        return load_plan(path)
    except PlanError as exc:
        named = (path, str(Path(path)))
        raise PlanError([error if error.startswith(named) else f"{path}: {error}" for error in exc.errors]) from None


def _opcode_counts(body: Sequence[Instruction]) -> dict[str, int]:
    counts = Counter(instruction.op for instruction in body)
    return {opcode.value: counts[opcode] for opcode in Opcode if counts[opcode]}


def _summarize_program(program: RankProgram) -> dict[str, Any]:
    return {
        "rank": program.rank,
        "device": program.device,
        "stage": program.stage,
        "prologue_length": len(program.prologue),
        "epilogue_length": len(program.epilogue),
        "phases": [
            {
                "phase": index,
                "length": len(body),
                "opcode_counts": _opcode_counts(body),
                "htask_streams": {str(h): stream for h, stream in htask_streams(body).items()},
            }
            for index, body in enumerate(program.phases)
        ],
    }


def summarize(plan: Plan) -> dict[str, Any]:
    """The plan's description as plain data (what ``--json`` prints and the tables show)."""
    placement = plan.placement
    return {
        "schema_version": plan.schema_version,
        "fingerprint": plan.fingerprint,
        "job": dataclasses.asdict(plan.job),
        "placement": {
            "device": placement.device,
            "num_devices": placement.num_devices,
            "num_ranks": placement.num_ranks,
            "pipeline_parallel": placement.pipeline_parallel,
            "tensor_parallel": placement.tensor_parallel,
            "data_parallel": placement.data_parallel,
            "stages": [
                {"id": s.id, "first_layer": s.first_layer, "last_layer": s.last_layer, "ranks": list(s.ranks)}
                for s in placement.stages
            ],
        },
        "num_subgraphs": len(plan.partition.subgraphs),
        "tasks": [
            {
                "name": task.name,
                "method": task.peft.method,
                "r": getattr(task.peft, "r", None),
                "steps": task.steps,
                "batch_size": task.batch_size,
                "max_seq_len": task.max_seq_len,
                "lr": task.lr,
                "num_examples": task.num_examples,
                "num_tokens": task.num_tokens,
            }
            for task in plan.tasks
        ],
        "phases": [
            {
                "id": phase.id,
                "first_round": phase.first_round,
                "last_round": phase.last_round,
                "num_rounds": phase.num_rounds,
                "rounds_per_body": phase.rounds_per_body,
                "tasks": list(phase.tasks),
                "htasks": [
                    {
                        "id": htask.id,
                        "tasks": list(htask.tasks),
                        "num_microbatches": htask.num_microbatches,
                        "micro_batch_tokens": htask.micro_batch_tokens,
                        "token_budgets": dict(zip(htask.tasks, htask.token_budgets)),
                    }
                    for htask in phase.htasks
                ],
            }
            for phase in plan.phases
        ],
        "programs": [_summarize_program(program) for program in plan.programs],
        "predictions": dataclasses.asdict(plan.predictions),
        "solver": [dataclasses.asdict(report) for report in plan.solver],
    }


def format_count(value: int) -> str:
    """An integer with thousands separators."""
    return f"{value:,}"


def format_seconds(value: float | None) -> str:
    """Seconds with 3 decimals (a tiny non-zero value in scientific notation, not as 0.000)."""
    if value is None:
        return "-"
    return f"{value:,.3f}" if value == 0 or value >= 0.0005 else f"{value:.1e}"


def format_ratio(value: float) -> str:
    """A fraction in [0, 1] as a percentage."""
    return f"{value * 100:.1f}%"


def format_gib(value: int | None) -> str:
    """A byte count in GiB."""
    return "-" if value is None else f"{value / GIB:,.2f}"


def format_rate(value: float | None) -> str:
    """Tokens per second, whole, with thousands separators."""
    return "-" if value is None else f"{value:,.0f}"


def render_table(headers: Sequence[str], rows: Sequence[Row], right: Sequence[int] = ()) -> list[str]:
    """A fixed-width table: a header line, a rule and one line per row; the columns indexed in
    ``right`` (numbers) are right-aligned, the others left-aligned."""
    return aligned_columns([headers, *rows], right=set(right), rule=True)


def _plural(count: int, noun: str) -> str:
    return f"{format_count(count)} {noun}{'' if count == 1 else 's'}"


def _section(title: str, lines: list[str]) -> list[str]:
    return ["", title, *(f"  {line}" for line in lines)]


def _job_lines(summary: dict[str, Any]) -> list[str]:
    job, placement = summary["job"], summary["placement"]
    lines = [
        f"model        {job['model']}",
        f"dtype        {job['dtype']}",
        f"output_dir   {job['output_dir']}",
        f"device       {placement['device']} x {placement['num_devices']}, {_plural(placement['num_ranks'], 'rank')} "
        f"(pipeline {placement['pipeline_parallel']} x tensor {placement['tensor_parallel']} "
        f"x data {placement['data_parallel']})",
        f"fingerprint  {summary['fingerprint'][:16]}  (schema {summary['schema_version']}, "
        f"{summary['num_subgraphs']} subgraphs)",
        "",
    ]
    stage_rows = [
        [str(s["id"]), f"{s['first_layer']}..{s['last_layer']}", ", ".join(map(str, s["ranks"]))]
        for s in placement["stages"]
    ]
    return lines + render_table(["stage", "layers", "ranks"], stage_rows, right=[0])


def _task_lines(summary: dict[str, Any]) -> list[str]:
    rows = [
        [
            t["name"],
            t["method"],
            "-" if t["r"] is None else str(t["r"]),
            format_count(t["steps"]),
            format_count(t["batch_size"]),
            format_count(t["max_seq_len"]),
            f"{t['lr']:g}",
            format_count(t["num_examples"]),
            format_count(t["num_tokens"]),
        ]
        for t in summary["tasks"]
    ]
    headers = ["name", "method", "r", "steps", "batch", "max_seq_len", "lr", "examples", "tokens"]
    return render_table(headers, rows, right=range(2, 9))


def _phase_lines(summary: dict[str, Any]) -> list[str]:
    rows = []
    for phase in summary["phases"]:
        for htask in phase["htasks"]:
            budgets = ", ".join(f"{name} {format_count(b)}" for name, b in htask["token_budgets"].items())
            rows.append(
                [
                    str(phase["id"]),
                    f"{phase['first_round']}..{phase['last_round']}"
                    + (f" ({phase['rounds_per_body']} per body)" if phase["rounds_per_body"] > 1 else ""),
                    str(htask["id"]),
                    ", ".join(htask["tasks"]),
                    format_count(htask["num_microbatches"]),
                    format_count(htask["micro_batch_tokens"]),
                    budgets,
                ]
            )
    headers = ["phase", "rounds", "htask", "tasks", "micro-batches", "mb tokens", "budgets per task"]
    active = [f"phase {p['id']}: {len(p['tasks'])} active ({', '.join(p['tasks'])})" for p in summary["phases"]]
    return active + [""] + render_table(headers, rows, right=[0, 2, 4, 5])


def _program_lines(summary: dict[str, Any]) -> list[str]:
    programs = summary["programs"]
    used = {op for program in programs for body in program["phases"] for op in body["opcode_counts"]}
    opcodes = [opcode.value for opcode in Opcode if opcode.value in used]
    rows = [
        [
            str(program["rank"]),
            str(program["stage"]),
            str(body["phase"]),
            format_count(body["length"]),
            *(format_count(body["opcode_counts"].get(op, 0)) for op in opcodes),
            ",".join(f"h{h}:{stream}" for h, stream in body["htask_streams"].items()),
        ]
        for program in programs
        for body in program["phases"]
    ]
    headers = ["rank", "stage", "phase", "total", *opcodes, "hTask:stream"]
    table = render_table(headers, rows, right=range(4 + len(opcodes)))
    ends = render_table(
        ["rank", "device", "prologue", "epilogue"],
        [
            [str(p["rank"]), p["device"], format_count(p["prologue_length"]), format_count(p["epilogue_length"])]
            for p in programs
        ],
        right=[0, 2, 3],
    )
    return ["instructions per round body, by opcode:", *table, "", "run once:", *ends]


def _prediction_lines(summary: dict[str, Any]) -> list[str]:
    predictions = summary["predictions"]
    rows = [
        [
            str(p["phase"]),
            format_seconds(p["seconds_per_round"]),
            format_count(p["tokens_per_round"]),
            format_rate(p["tokens_per_second"]),
            format_ratio(p["bubble_fraction"]),
            format_seconds(p["exposed_communication_seconds"]),
            format_ratio(p["ineffective_token_ratio"]),
            " ".join(format_gib(b) for b in p["peak_memory_bytes"]),
        ]
        for p in predictions["phases"]
    ]
    headers = ["phase", "s/round", "tokens/round", "tokens/s", "bubble", "exposed comm s", "ineffective", "peak GiB"]
    totals = [
        f"rounds {format_count(predictions['num_rounds'])}, "
        f"~{format_count(predictions['tokens_per_round'])} tokens per round",
        f"est_total_seconds      {format_seconds(predictions['est_total_seconds'])}",
        f"est_seconds_per_round  {format_seconds(predictions['est_seconds_per_round'])}",
        f"est_tokens_per_second  {format_rate(predictions['est_tokens_per_second'])}",
        f"est_peak_memory        {format_gib(predictions['est_peak_memory_bytes'])} GiB",
        "",
    ]
    note = "(peak GiB: one value per rank, rank 0 first)"
    return totals + render_table(headers, rows, right=range(7)) + [note]


def _solver_lines(summary: dict[str, Any]) -> list[str]:
    if not summary["solver"]:
        return ["(no solver report)"]
    rows = [
        [
            str(r["phase"]),
            r["method"],
            r["status"],
            format_seconds(r["objective_seconds"]),
            format_seconds(r["fastest_seconds"]),
            format_seconds(r["bound_seconds"]),
            format_ratio(r["gap"]),
            format_seconds(r["deterministic_seconds"]),
            format_count(r["num_candidates"]),
        ]
        for r in summary["solver"]
    ]
    headers = ["phase", "method", "status", "round s", "fastest s", "bound s", "gap", "deterministic s", "candidates"]
    return render_table(headers, rows, right=[0, 3, 4, 5, 6, 7, 8])


def render_text(path: str, summary: dict[str, Any]) -> str:
    """The human-readable report of a `summarize` result."""
    lines = [f"plan {path}"]
    lines += _section("Job", _job_lines(summary))
    lines += _section(f"Tasks ({len(summary['tasks'])})", _task_lines(summary))
    lines += _section(f"Phases ({len(summary['phases'])})", _phase_lines(summary))
    lines += _section(f"Programs ({_plural(len(summary['programs']), 'rank')})", _program_lines(summary))
    lines += _section("Predictions", _prediction_lines(summary))
    lines += _section("Solver", _solver_lines(summary))
    return "\n".join(line.rstrip() for line in lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line: a plan file, ``--json`` and ``--debug``."""
    parser = argparse.ArgumentParser(prog=PROG, description="Describe a compiled MuxTune plan file.")
    parser.add_argument("plan", help="plan file written by muxtune-compile")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print the description of a plan file; 2 on bad input (the error names the file)."""
    args = build_parser().parse_args(argv)

    def inspect_command() -> int:
        summary = summarize(read_plan(args.plan))
        text = json.dumps({"file": args.plan, **summary}, indent=2) if args.json else render_text(args.plan, summary)
        try:
            print(text, flush=True)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        return 0

    return run_command(PROG, inspect_command, args.debug)


entry = console_entry(main)


if __name__ == "__main__":
    entry()
