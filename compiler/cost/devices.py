"""Device tables: what the cost model assumes of a device type before any profile.

GPU rows are the vendors' dense peak rates times an achievable fraction; the CPU row was
measured on this project's development machine (a 2-core AMD EPYC, torch 2.13: bf16 GEMM
~200 GFLOP/s on 2048 x 576 x 1536, fp32 ~90, a 256 MB copy at ~40 GB/s, ~4 us per tiny eager
op). Machines differ; `muxtune-profile` measures the one at hand and `--profile` uses it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GIB = 1 << 30


@dataclass(frozen=True)
class DeviceSpec:
    """Rates and sizes of one device type. ``matmul_flops`` maps a dtype to achievable GEMM
    FLOP/s; ``memory_bandwidth`` is bytes/s of device memory; ``op_overhead_seconds`` is the
    eager cost of issuing one operator; the link is what p2p sends and all-reduces between two
    devices of this type run over; ``runtime_bytes`` is what a process holds before the job's
    tensors (torch, the CUDA context); ``chunk_tokens`` is the alignment unit of micro-batch
    token budgets (tensor-core tiles on GPUs). ``parallel_streams`` hTasks can run at once on
    separate streams (CPU: one lane of intra-op threads each), each then taking
    ``stream_slowdown`` times as long as it would alone with the whole device. Where
    ``weight_read_bandwidth`` is set, every GEMM call also reads its weights from memory at that
    rate before its FLOPs (a CPU core does not overlap the two, and a micro-batch's weights are
    out of cache by the next one); otherwise a GEMM takes the larger of its FLOP and weight-byte
    times (a GPU streams weights while it computes)."""

    name: str
    kind: str
    matmul_flops: dict[str, float]
    memory_bandwidth: float
    memory_bytes: int
    op_overhead_seconds: float
    link_bandwidth: float
    link_latency_seconds: float
    runtime_bytes: int
    chunk_tokens: int
    parallel_streams: int = 1
    stream_slowdown: float = 1.0
    weight_read_bandwidth: float | None = None

    def flops(self, dtype: str) -> float:
        """Achievable GEMM FLOP/s in ``dtype``."""
        return self.matmul_flops[dtype]


_GPU_EFFICIENCY = 0.7
"""Share of the datasheet's dense peak that large GEMMs reach in practice."""


def _gpu(
    name: str, bf16_tflops: float, tf32_tflops: float, memory_gb: int, bandwidth_tb: float, link_gb: float
) -> DeviceSpec:
    half = bf16_tflops * 1e12 * _GPU_EFFICIENCY
    return DeviceSpec(
        name=name,
        kind="cuda",
        matmul_flops={"bf16": half, "fp16": half, "fp32": tf32_tflops * 1e12 * _GPU_EFFICIENCY},
        memory_bandwidth=bandwidth_tb * 1e12 * 0.8,
        memory_bytes=memory_gb * GIB,
        op_overhead_seconds=8e-6,
        link_bandwidth=link_gb * 1e9,
        link_latency_seconds=10e-6,
        runtime_bytes=600 * (1 << 20),
        chunk_tokens=64,
    )


CPU_STREAM_SLOWDOWN = 1.6
"""How much longer an hTask takes on one of two lanes (each with one of a 2-core CPU's intra-op
threads, the other lane busy) than alone on both cores. Measured on the 8-layer SmolLM2
benchmark job (torch 2.13, 2-core AMD EPYC): one intra-op thread alone is 1.41x slower than two
(880 against 1,245 tokens/s), but two lanes at once share the memory bandwidth and the GIL, and
the planner's plan ran 1.09x faster side by side than one hTask after another, which this
value reproduces from the cost model's per-hTask times."""

CPU_WEIGHT_READ_BANDWIDTH = 1.5e10
"""Bytes/s at which the CPU's GEMMs re-read their weights on every call, on top of their FLOPs.
Measured on the 8-layer SmolLM2 benchmark job's layers (56 MB of bf16 weights, one intra-op
thread, torch 2.13, 2-core AMD EPYC): a forward over them takes ~7.5 ms + 0.263 ms per row, so
one thread reads at ~7.5 GB/s and both at ~15; in the two-lane job, entailment's four
micro-batches took 1.12 s a round against 0.98 s for one."""

DEVICE_TABLES: dict[str, DeviceSpec] = {
    "cpu": DeviceSpec(
        name="cpu",
        kind="cpu",
        matmul_flops={"bf16": 2.0e11, "fp16": 5.0e10, "fp32": 9.0e10},
        memory_bandwidth=4.0e10,
        memory_bytes=24 * GIB,
        op_overhead_seconds=6e-6,
        link_bandwidth=5.0e9,
        link_latency_seconds=50e-6,
        runtime_bytes=420 * (1 << 20),
        chunk_tokens=1,
        parallel_streams=2,
        stream_slowdown=CPU_STREAM_SLOWDOWN,
        weight_read_bandwidth=CPU_WEIGHT_READ_BANDWIDTH,
    ),
    "a40": _gpu("a40", 149.7, 74.8, 48, 0.696, 25.0),
    "a100": _gpu("a100", 312.0, 156.0, 80, 2.039, 300.0),
    "h100": _gpu("h100", 989.0, 494.0, 80, 3.35, 450.0),
    "h200": _gpu("h200", 989.0, 494.0, 141, 4.8, 450.0),
}
DEVICE_TABLES["cuda"] = dataclasses.replace(DEVICE_TABLES["h100"], name="cuda")
"""A GPU of unknown type is planned for as an H100."""


MEMORY_RESERVE = 0.08
"""Share of a device's memory the planner leaves free for what its model does not count:
allocator fragmentation, library workspaces, thread arenas. Measured CPU peaks came within
3% of the prediction, either side, on different machines."""


def planning_bytes(memory_bytes: int) -> int:
    """The part of ``memory_bytes`` the planner may fill."""
    return int(memory_bytes * (1.0 - MEMORY_RESERVE))


def device_spec(name: str, memory_gb: float | str = "auto") -> DeviceSpec:
    """The table row for ``name`` (``cpu``, ``cuda``, ``a40``, ``a100``, ``h100``, ``h200``), with
    the memory size the spec declares (``cluster.memory_gb``) when not ``auto``."""
    spec = DEVICE_TABLES[name]
    if memory_gb != "auto":
        spec = dataclasses.replace(spec, memory_bytes=int(float(memory_gb) * GIB))
    return spec
