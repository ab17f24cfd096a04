"""Measuring this machine for the cost model (`muxtune-profile`).

Rates: achieved GEMM FLOP/s on the backbone's layer shapes, memory bandwidth of a large copy, the
wall time of one tiny eager op, and the resident memory of a bare runtime process. With a model:
the real backbone loaded through the runtime's own code, one LoRA task attached through the
engine, and the wall time of what a micro-batch costs at several shapes: the decoder stack's
forward and backward over packed sequences (the runtime's layout and packed attention), the
loss (head on the scored rows, fp32 cross entropy, forward and backward, as the engine computes
it) and the task's optimizer step. Every figure is a median of `repeats` calls after a warm-up.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from muxtune.common.errors import UserError
from muxtune.runtime.backbone import DTYPES, LoadedBackbone, load_model
from muxtune.runtime.data import Example
from muxtune.runtime.engine import MultiTaskEngine, TaskTraining
from muxtune.runtime.packing import IGNORE_INDEX, MicroBatch, build_microbatch
from muxtune.specs import LoraSpec

from .cost.profile import PROFILE_VERSION, Measurement, Profile

DEFAULT_TOKEN_COUNTS = (128, 512, 2048)
DEFAULT_SEQUENCE_LENGTHS = (64, 256)
DEFAULT_LORA_RANK = 8
MATMUL_TOKENS = 2048
BARE_MATMUL_SHAPE = (2048, 1024, 1024)
COPY_BYTES = 256 * 2**20
TINY_OP_CALLS = 200
MIN_SAMPLE_SECONDS = 0.02
"""A rate sample repeats its call until it lasts at least this long (timer resolution, jitter)."""
CONTENTION_WARNING_CORES = 0.25
"""Warn when other processes kept more than this many cores busy on average while measuring."""
PROFILE_TASK = "profile"
LORA_TARGETS: dict[str, tuple[str, ...]] = {"gpt2": ("c_attn",)}
"""The measurement task's LoRA targets per family (default q_proj and v_proj; gpt2 fuses them)."""
RUNTIME_PROBE = """
import torch, muxtune.runtime.executor
from muxtune.common.memory import peak_resident_bytes
print(peak_resident_bytes())
"""
"""Prints the resident bytes of a process that imported torch and the runtime (what `muxtune-run` imports)."""

Progress = Callable[[str], None]


class ProfilingError(UserError):
    """The model cannot be measured (it does not load, or the shapes asked for do not fit it)."""


def measure_profile(
    model: str | None,
    dtype: str,
    *,
    token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS,
    sequence_lengths: Sequence[int] = DEFAULT_SEQUENCE_LENGTHS,
    repeats: int = 3,
    lora_rank: int = DEFAULT_LORA_RANK,
    device: str = "cpu",
    progress: Progress | None = None,
) -> Profile:
    """Measure this machine's rates in `dtype` on `device` ("cpu" or "cuda"), and, with a
    model (a job spec's `model` string), the components of a micro-batch at every (tokens,
    sequence length) pair with tokens a multiple of the length. A model that does not resolve
    or load raises a `UserError`; bad arguments raise ValueError."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if repeats < 1 or lora_rank < 1:
        raise ValueError(f"repeats and lora_rank must be positive, got {repeats} and {lora_rank}")
    if any(t < 1 for t in token_counts) or any(s < 2 for s in sequence_lengths):
        raise ValueError(
            f"token counts must be positive and sequence lengths at least 2, got {token_counts}, {sequence_lengths}"
        )
    say = progress or (lambda _: None)
    torch_device = torch.device(device)
    if device == "cuda" and not torch.cuda.is_available():
        raise ProfilingError("device cuda: no CUDA GPU is visible")
    loaded = _load(model, dtype, device) if model is not None else None
    if model is not None and not model.startswith("builtin:"):
        model = str(Path(model).expanduser().resolve())  # as a parsed job spec holds it
    shapes: list[tuple[int, int]] = []
    if loaded is not None:
        config = loaded.config
        shapes = _shapes(token_counts, sequence_lengths, config.max_position_embeddings, model or "")
        params = sum(p.numel() for p in loaded.model.parameters())
        say(f"{model}: {params / 1e6:.1f}M parameters, {config.num_layers} layers, {dtype} on {device}")
    torch_dtype = DTYPES[dtype]
    meter = ContentionMeter()
    meter.start()
    matmul_flops = _matmul_flops(loaded, torch_dtype, torch_device, repeats, say)
    memory_bandwidth = _memory_bandwidth(torch_device, repeats, say)
    op_overhead = _op_overhead(torch_device, repeats, say)
    runtime_bytes = _runtime_bytes(say)
    measurements: list[Measurement] = []
    if loaded is not None:
        measurements = _measure_model(loaded, shapes, lora_rank, repeats, say)
    busy = meter.stop()
    if busy is not None and busy > CONTENTION_WARNING_CORES:
        say(
            f"warning: other processes kept {busy:.1f} cores busy on average while measuring; "
            "the times may be too long and the rates too low: measure again on a quiet machine"
        )
    return Profile(
        version=PROFILE_VERSION,
        device=device,
        dtype=dtype,
        machine=machine_description(device),
        threads=torch.get_num_threads(),
        matmul_flops=matmul_flops,
        memory_bandwidth=memory_bandwidth,
        op_overhead_seconds=op_overhead,
        runtime_bytes=runtime_bytes,
        model=model,
        backbone=loaded.config.to_dict() if loaded is not None else None,
        lora_rank=lora_rank,
        measurements=tuple(measurements),
    )


class ContentionMeter:
    """How many cores other processes kept busy between `start` and `stop` (Linux /proc/stat
    minus this process's own CPU time; None elsewhere)."""

    def __init__(self) -> None:
        self.started: tuple[float, float, float] | None = None

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat", encoding="ascii") as handle:
                fields = handle.readline().split()
        except OSError:
            return None
        if not fields or fields[0] != "cpu" or len(fields) < 8:
            return None
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
        busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
        own = os.times()
        return time.monotonic(), busy, own.user + own.system + own.children_user + own.children_system

    def start(self) -> None:
        self.started = self._sample()

    def stop(self) -> float | None:
        """Average cores busy with other processes since `start`."""
        ended = self._sample()
        if self.started is None or ended is None or ended[0] <= self.started[0]:
            return None
        wall = ended[0] - self.started[0]
        others = (ended[1] - self.started[1]) - (ended[2] - self.started[2])
        return max(0.0, others / wall)


def machine_description(device: str) -> str:
    """``<processor or GPU>, <N> cores, torch <version>``."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = _cpu_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores, torch {torch.__version__}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _load(model: str, dtype: str, device: str) -> LoadedBackbone:
    """The backbone as the executor loads it; a model that does not load is a user error."""
    try:
        return load_model(model, dtype, device)
    except UserError:
        raise
    except (ValueError, FileNotFoundError) as exc:
        raise ProfilingError(str(exc)) from None


def _shapes(
    token_counts: Sequence[int], sequence_lengths: Sequence[int], max_positions: int, model: str
) -> list[tuple[int, int]]:
    """(tokens, sequence length) pairs to measure: tokens a multiple of a length the model takes."""
    pairs = [
        (tokens, length)
        for tokens in sorted(set(token_counts))
        for length in sorted(set(sequence_lengths))
        if length <= tokens and tokens % length == 0 and length <= max_positions
    ]
    if not pairs:
        raise ProfilingError(
            f"{model}: no token count {list(token_counts)} is a multiple of a sequence length "
            f"{list(sequence_lengths)} of at most {max_positions} positions"
        )
    return pairs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(call: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall time of one call (the device synchronized before and after) and its result."""
    _sync(device)
    start = time.perf_counter()
    result = call()
    _sync(device)
    return time.perf_counter() - start, result


def _seconds_per_call(call: Callable[[], Any], device: torch.device, repeats: int, inner: int = 1) -> float:
    """Median wall time of one call over `repeats` samples after a warm-up; a sample runs the
    call `inner` times, more when that lasts under `MIN_SAMPLE_SECONDS`."""

    def sample(n: int) -> float:
        def run() -> None:
            for _ in range(n):
                call()

        return _timed(run, device)[0]

    warm = sample(inner)
    if warm < MIN_SAMPLE_SECONDS:
        inner = max(inner, math.ceil(inner * MIN_SAMPLE_SECONDS / max(warm, 1e-9)))
    return statistics.median(sample(inner) for _ in range(repeats)) / inner


def _matmul_flops(
    loaded: LoadedBackbone | None, dtype: torch.dtype, device: torch.device, repeats: int, say: Progress
) -> float:
    """Achieved GEMM FLOP/s: the median over the backbone's layer shapes (or one square shape)."""
    if loaded is None:
        shapes = [BARE_MATMUL_SHAPE]
    else:
        hidden, inner = loaded.config.hidden_size, loaded.config.intermediate_size
        shapes = [(MATMUL_TOKENS, hidden, inner), (MATMUL_TOKENS, inner, hidden), (MATMUL_TOKENS, hidden, hidden)]
    generator = torch.Generator(device=device).manual_seed(0)
    rates = []
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=generator, device=device).to(dtype)
        b = torch.randn(k, n, generator=generator, device=device).to(dtype)
        seconds = _seconds_per_call(lambda: torch.mm(a, b), device, max(repeats, 3))
        rates.append(2.0 * m * k * n / seconds)
    rate = statistics.median(rates)
    say(f"matmul: {rate / 1e9:.1f} GFLOP/s (median over {len(shapes)} shapes)")
    return rate


def _memory_bandwidth(device: torch.device, repeats: int, say: Progress) -> float:
    """Bytes per second of a large tensor copy, reads and writes counted."""
    source = torch.ones(COPY_BYTES // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    seconds = _seconds_per_call(lambda: target.copy_(source), device, max(repeats, 3))
    rate = 2.0 * COPY_BYTES / seconds
    say(f"memory: {rate / 1e9:.1f} GB/s (copy of {COPY_BYTES >> 20} MiB)")
    return rate


def _op_overhead(device: torch.device, repeats: int, say: Progress) -> float:
    """Wall time of one tiny eager op (an add of two 8-element tensors)."""
    a = torch.ones(8, device=device)
    b = torch.ones(8, device=device)
    seconds = _seconds_per_call(lambda: torch.add(a, b), device, max(repeats, 5), inner=TINY_OP_CALLS)
    say(f"op overhead: {seconds * 1e6:.2f} us")
    return seconds


def _runtime_bytes(say: Progress) -> int:
    """Peak resident memory of a fresh process that imported torch and the runtime, nothing built."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", RUNTIME_PROBE], capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProfilingError(f"cannot measure a bare runtime process's memory: {exc}") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].isdigit():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ProfilingError(f"cannot measure a bare runtime process's memory: {tail}")
    value = int(lines[-1])
    say(f"runtime process: {value / 2**20:.0f} MiB resident")
    return value


def _microbatch(num_tokens: int, length: int, vocab_size: int, generator: torch.Generator) -> MicroBatch:
    """num_tokens / length sequences of `length` random tokens, the last half of each scored;
    the stack's output covers every row (the cost model counts the last layer's saving on
    unscored rows itself)."""
    examples = []
    for index in range(num_tokens // length):
        ids = torch.randint(vocab_size, (length,), generator=generator).tolist()
        is_target = tuple(j >= length - length // 2 for j in range(length))
        examples.append(Example(index=index, input_ids=tuple(ids), is_target=is_target))
    return build_microbatch([(PROFILE_TASK, e) for e in examples], scored_output_rows=False)


def _measure_model(
    loaded: LoadedBackbone, shapes: list[tuple[int, int]], lora_rank: int, repeats: int, say: Progress
) -> list[Measurement]:
    """Forward, backward and loss at every shape, then the optimizer step, on one LoRA task."""
    model = loaded.model
    engine = MultiTaskEngine(model)
    targets = LORA_TARGETS.get(loaded.config.family, ("q_proj", "v_proj"))
    peft = LoraSpec(r=lora_rank, alpha=2 * lora_rank, dropout=0.0, target_modules=targets)
    state = engine.add_task(TaskTraining(name=PROFILE_TASK, peft=peft, lr=1e-4, steps=2**31))
    device = engine.device
    hidden_dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(0)
    measurements: list[Measurement] = []
    for num_tokens, length in shapes:
        mb = _microbatch(num_tokens, length, loaded.config.vocab_size, generator)
        input_ids, positions = mb.input_ids_T.to(device), mb.position_ids_T.to(device)
        grad = torch.randn(num_tokens, loaded.config.hidden_size, generator=generator).to(device, hidden_dtype)
        scored = int((mb.targets_T != IGNORE_INDEX).sum())
        state.normalizer = scored
        forward, backward, loss = [], [], []
        for attempt in range(repeats + 1):
            times = _layer_and_loss_times(engine, mb, input_ids, positions, grad)
            if attempt:  # the first is the warm-up
                forward.append(times[0])
                backward.append(times[1])
                loss.append(times[2])
        state.pending_loss, state.pending_target_tokens, state.pending_tokens = 0.0, 0, 0
        common = {"tokens": num_tokens, "sequence_length": length, "trainable_parameters": 0}
        measurements += [
            Measurement("layers_forward", target_tokens=0, seconds=statistics.median(forward), **common),
            Measurement("layers_backward", target_tokens=0, seconds=statistics.median(backward), **common),
            Measurement("loss", target_tokens=scored, seconds=statistics.median(loss), **common),
        ]
        say(
            f"{num_tokens} tokens ({num_tokens // length} x {length}): forward {statistics.median(forward):.4f} s, "
            f"backward {statistics.median(backward):.4f} s, loss ({scored} scored) {statistics.median(loss):.4f} s"
        )
    measurements.append(_optimizer_measurement(engine, repeats, say))
    return measurements


def _layer_and_loss_times(
    engine: MultiTaskEngine, mb: MicroBatch, input_ids: torch.Tensor, positions: torch.Tensor, grad: torch.Tensor
) -> tuple[float, float, float]:
    """Seconds of one decoder-stack forward, its backward from `grad`, and the loss's forward
    and backward from the final hidden states (a leaf, so the stack is not run again)."""
    model, device = engine.model, engine.device
    seconds_forward, hidden = _timed(lambda: model.hidden_states(input_ids, positions, mb.layout), device)
    seconds_backward, _ = _timed(lambda: hidden.backward(grad), device)
    leaf = hidden.detach().requires_grad_()

    def loss_forward_backward() -> None:
        loss = engine.segment_losses(leaf, mb)
        assert loss is not None, "the profiling micro-batch scores no token"
        loss.backward()

    seconds_loss, _ = _timed(loss_forward_backward, device)
    return seconds_forward, seconds_backward, seconds_loss


def _optimizer_measurement(engine: MultiTaskEngine, repeats: int, say: Progress) -> Measurement:
    """The task's optimizer step as the engine takes it (clip, schedule, AdamW, checks), on
    small random gradients set before each step."""
    state = engine.tasks[PROFILE_TASK]
    params = state.parameters
    generator = torch.Generator().manual_seed(1)
    times = []
    for attempt in range(repeats + 1):
        for p in params:
            p.grad = (1e-3 * torch.randn(p.shape, generator=generator)).to(p.device, p.dtype)
        state.normalizer = 1
        seconds, result = _timed(lambda: engine.optimizer_step(PROFILE_TASK), engine.device)
        assert not result.diverged, "the profiling task diverged on small random gradients"
        if attempt:
            times.append(seconds)
    count = sum(p.numel() for p in params)
    seconds = statistics.median(times)
    say(f"optimizer step ({count} trainable parameters): {seconds:.4f} s")
    return Measurement("optimizer", 0, 0, 0, count, seconds)
