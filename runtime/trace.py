"""The executor's own event log (`muxtune-run --trace`): every instruction of the rounds with its
start and end on this machine's monotonic clock, one file per rank in the Chrome trace format
(open it in Perfetto or chrome://tracing: one process per rank, one row per compute stream and
one for exchanges). A send's row spans from its issue until the round's end drains it; the matching
receive on the peer shows when the data arrived.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from muxtune.common.files import atomic_write_bytes
from muxtune.plans import AllReduce, Instruction, Recv, Send

TRACE_DIR = "trace"
COMPUTE_ROW, EXCHANGE_ROW = 0, 1


def compute_row(stream: int) -> int:
    """The trace row of compute on ``stream`` (stream 0 on `COMPUTE_ROW`, the others below the
    exchange row)."""
    return COMPUTE_ROW if stream == 0 else EXCHANGE_ROW + stream


def instruction_label(instruction: Instruction) -> str:
    """``forward h0 mb1 sg2``: the opcode and its micro-batch coordinates."""
    fields = dataclasses.asdict(instruction)
    parts = [instruction.op.value]
    for key, short in (("htask", "h"), ("microbatch", "mb"), ("subgraph", "sg"), ("peer", "peer")):
        if key in fields:
            parts.append(f"{short}{fields[key]}")
    if isinstance(instruction, (Send, Recv)):
        parts.append("grad" if instruction.grad else "act")
    return " ".join(parts)


class ExecutionTrace:
    """Instruction events of one rank, written as ``<output_dir>/trace/rank-<R>.json``."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.events: list[dict[str, Any]] = []
        self.origin = time.perf_counter()
        self.streams: set[int] = {0}

    def record(self, instruction: Instruction, round_index: int, start: float, end: float) -> None:
        """One instruction's span (perf_counter seconds, which every process on a machine shares)."""
        if isinstance(instruction, (Send, Recv, AllReduce)):
            row = EXCHANGE_ROW
        else:
            stream = getattr(instruction, "stream", 0)
            self.streams.add(stream)
            row = compute_row(stream)
        args = {**dataclasses.asdict(instruction), "op": instruction.op.value, "round": round_index}
        self.events.append(
            {
                "name": instruction_label(instruction),
                "ph": "X",
                "ts": start * 1e6,
                "dur": max(end - start, 0.0) * 1e6,
                "pid": self.rank,
                "tid": row,
                "args": args,
            }
        )

    def write(self, output_dir: Path) -> Path:
        path = output_dir / TRACE_DIR / f"rank-{self.rank}.json"
        names = [
            {"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": f"rank {self.rank}"}},
            {"name": "thread_name", "ph": "M", "pid": self.rank, "tid": EXCHANGE_ROW, "args": {"name": "exchange"}},
        ]
        names += [
            {"name": "thread_name", "ph": "M", "pid": self.rank, "tid": compute_row(s), "args": {"name": _row_name(s)}}
            for s in sorted(self.streams)
        ]
        payload = {"traceEvents": names + self.events, "displayTimeUnit": "ms"}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(payload).encode())
        return path


def _row_name(stream: int) -> str:
    return "compute" if stream == 0 else f"compute, stream {stream}"
