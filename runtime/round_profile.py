"""`muxtune-run --profile`: torch.profiler over a few round bodies of the run (a body covers one
round, or several: `Phase.rounds_per_body`), after the first (whose allocations and first calls
are not representative). Each rank writes
``<output_dir>/profile/rank-<R>.txt`` (operators by self time, the table people read first) and
``rank-<R>.json`` (the Chrome trace of the same rounds, for Perfetto). Every thread's operators
are recorded: on the CPU a round's hTask streams run on lanes of their own (`execution.lanes`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from muxtune.common.files import atomic_write_bytes

PROFILE_DIR = "profile"
SKIPPED_ROUNDS = 1
PROFILED_ROUNDS = 3
TABLE_ROWS = 40


class RoundProfiler:
    """Profiles round bodies ``SKIPPED_ROUNDS + 1`` to ``SKIPPED_ROUNDS + PROFILED_ROUNDS`` of one
    rank (fewer when the run has fewer); `step` is called at the end of every body."""

    def __init__(self, output_dir: Path, rank: int, device: str) -> None:
        self.folder = output_dir / PROFILE_DIR
        self.rank = rank
        self.on_cuda = torch.device(device).type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_cuda else [])
        self.rounds = 0
        self.written: Path | None = None
        self.profiler = profile(
            activities=activities,
            schedule=schedule(wait=SKIPPED_ROUNDS, warmup=0, active=PROFILED_ROUNDS, repeat=1),
            on_trace_ready=self._write,
            experimental_config=torch._C._profiler._ExperimentalConfig(profile_all_threads=True),
        )

    def __enter__(self) -> RoundProfiler:
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.profiler.__exit__(*exc)

    def step(self) -> None:
        """One round body ended."""
        self.rounds += 1
        self.profiler.step()

    def report(self) -> str:
        """Where the profile went, or why there is none."""
        if self.written is None:
            return f"profile: the run had no round body after the first {SKIPPED_ROUNDS}; nothing profiled"
        return f"profile: {self.written} (and the trace beside it)"

    def _write(self, done: profile) -> None:
        sort_by = "self_cuda_time_total" if self.on_cuda else "self_cpu_time_total"
        profiled = max(0, min(self.rounds, SKIPPED_ROUNDS + PROFILED_ROUNDS) - SKIPPED_ROUNDS)
        header = (
            f"rank {self.rank}: {profiled} round body(ies) after the first {SKIPPED_ROUNDS}, operators by self time\n\n"
        )
        table = done.key_averages().table(sort_by=sort_by, row_limit=TABLE_ROWS)
        self.folder.mkdir(parents=True, exist_ok=True)
        text_path = self.folder / f"rank-{self.rank}.txt"
        atomic_write_bytes(text_path, (header + table + "\n").encode())
        trace_path = self.folder / f"rank-{self.rank}.json"
        done.export_chrome_trace(str(trace_path.with_suffix(".json.part")))
        trace_path.with_suffix(".json.part").replace(trace_path)
        self.written = text_path
