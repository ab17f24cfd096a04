"""Model FLOP utilization for `muxtune-bench`: the measured bf16 matmul peak of the bench's device
and the share of it a row's training reached.

A LoRA step on a frozen backbone costs about 4 x parameters FLOPs per token: 2 for the forward
pass and 2 for the backward pass's activation gradients (no weight gradients; the adapters'
FLOPs and attention's score and value products are left out). MFU counts non-padding tokens only,
so a padded batch's extra work is not utilization. These are model FLOPs: the output head counts
for every token, also where MuxTune makes logits for the scored tokens only, so on a model whose
head is a large share of its parameters (SmolLM2's 8 first layers: half) MFU is well above the
share of the peak the device's products actually run at.

The peak is measured in a process of its own (`peak_in_subprocess`), so the bench's own process
never holds a CUDA context: on CUDA a 8192 x 8192 x 8192 bf16 matmul timed with CUDA events after
warm-up, on CPU a 2048 one with one thread per core, as the runs use; the best of several runs.

    python -m muxtune.tools.bench_mfu cpu|cuda
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

FLOPS_PER_PARAMETER_TOKEN = 4
"""Forward (2) and backward activation gradients (2); the backbone has no weight gradients."""
SIZES = {"cuda": 8192, "cpu": 2048}
WARMUP = {"cuda": 5, "cpu": 1}
RUNS = {"cuda": 20, "cpu": 3}


@dataclass(frozen=True)
class PeakFlops:
    """The measured bf16 matmul peak of one device: FLOP/s, the matmul's size and the device's name."""

    flops: float
    size: int
    device: str

    def describe(self) -> str:
        """The peak and how it was found, for the tables."""
        if not self.size:
            return f"{self.flops / 1e12:,.2f} TFLOP/s ({self.device})"
        return f"{self.flops / 1e12:,.2f} TFLOP/s measured ({self.size}^3 bf16 matmul on {self.device})"


def model_flop_utilization(flop_parameters: int, tokens: int, seconds: float, peak_flops: float) -> float:
    """The share of ``peak_flops`` that 4 x ``flop_parameters`` x ``tokens`` in ``seconds`` reaches."""
    return FLOPS_PER_PARAMETER_TOKEN * flop_parameters * tokens / seconds / peak_flops


def bench_device(device: str) -> str:
    """``cpu`` or ``cuda`` for a spec's cluster device, ``auto`` resolved as the compiler does."""
    from muxtune.compiler.compile import resolve_device

    return "cpu" if resolve_device(device) == "cpu" else "cuda"


def measure_peak_flops(device: str) -> PeakFlops:
    """The best bf16 matmul FLOP/s of several timed runs on ``device`` (``cpu`` or ``cuda``)."""
    size = SIZES[device]
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    a = torch.randn(size, size, device=device).to(torch.bfloat16)
    b = torch.randn(size, size, device=device).to(torch.bfloat16)
    for _ in range(WARMUP[device]):
        torch.mm(a, b)
    seconds = []
    for _ in range(RUNS[device]):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000)
        else:
            started = time.perf_counter()
            torch.mm(a, b)
            seconds.append(time.perf_counter() - started)
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return PeakFlops(2 * size**3 / min(seconds), size, name)


def peak_in_subprocess(device: str) -> PeakFlops:
    """`measure_peak_flops` in a process of its own; RuntimeError with its error output when it fails."""
    command = [sys.executable, "-m", "muxtune.tools.bench_mfu", device]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"measuring the bf16 peak: `{' '.join(command)}` exited with {done.returncode}:\n{tail}")
    return PeakFlops(**json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in SIZES:
        print("usage: python -m muxtune.tools.bench_mfu cpu|cuda", file=sys.stderr)
        return 2
    print(json.dumps(asdict(measure_peak_flops(args[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
