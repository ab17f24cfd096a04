"""Cases, implementations and work counts for `muxtune.tools.bench_kernels`.

A case is one packed micro-batch of T tokens shared by P tasks: task p owns the contiguous row
segment p (segments in task order, covering every row; empty ones allowed), its rank r_p and its
scaling s_p. Every implementation computes, differentiably in x, every A_p and every B_p,

    y[seg_p] = base[seg_p] + s_p * (x[seg_p] @ A_p^T) @ B_p^T
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from muxtune.kernels import LoraSlots, SegmentLayout, segmented_lora

MIXED_RANKS = (4, 8, 16, 32, 64)
"""The ranks a "mixed" case draws each task's rank from."""
IMPLS = ("segmented", "loop", "padded", "grouped_mm")


@dataclass(frozen=True)
class CaseSpec:
    """One benchmark case: task count, rank choice ("mixed" or a uniform rank), segment size
    distribution, tokens, feature sizes; `ranks` and `sizes` are the drawn per-task values."""

    tasks: int
    rank_mode: str
    dist: str
    tokens: int
    d_in: int
    d_out: int
    ranks: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"P={self.tasks} r={self.rank_mode} {self.dist} T={self.tokens} {self.d_in}x{self.d_out}"

    @property
    def segments(self) -> tuple[tuple[int, int, int], ...]:
        bounds, cursor = [], 0
        for p, size in enumerate(self.sizes):
            bounds.append((cursor, cursor + size, p))
            cursor += size
        return tuple(bounds)

    def forward_flops(self) -> int:
        """2 * n_p * r_p * (D + O) summed over tasks: real rows and real ranks only."""
        return sum(2 * n * r * (self.d_in + self.d_out) for n, r in zip(self.sizes, self.ranks))

    def backward_flops(self) -> int:
        """dh = g B (2nrO), dx = dh A (2nrD), dA = dh^T x (2nrD), dB = g^T h (2nrO): twice forward."""
        return 2 * self.forward_flops()

    def forward_bytes(self, elem: int) -> int:
        """Shrink reads x and A, writes h; expand reads h, B and base, writes y."""
        t, d, o = self.tokens, self.d_in, self.d_out
        h = sum(n * r for n, r in zip(self.sizes, self.ranks))
        weights = sum(r * (d + o) for r in self.ranks)
        return elem * (t * d + 2 * h + weights + 2 * t * o)

    def backward_bytes(self, elem: int) -> int:
        """dh: g, B -> dh; dx: dh, A -> dx; dA: dh, x -> dA; dB: h, g -> dB."""
        t, d, o = self.tokens, self.d_in, self.d_out
        h = sum(n * r for n, r in zip(self.sizes, self.ranks))
        weights = sum(r * (d + o) for r in self.ranks)
        return elem * (2 * t * o + 2 * t * d + 4 * h + 2 * weights)


def make_case(tasks: int, rank_mode: str, dist: str, tokens: int, d_in: int, d_out: int, seed: int) -> CaseSpec:
    """Draw a case's ranks and segment sizes (deterministic in the arguments and `seed`).

    "uniform": T split evenly. "skewed": one huge segment (task P // 2), P // 4 empty ones and
    the rest tiny (1 to T / (8 P) rows)."""
    rng = random.Random(f"{seed}-{tasks}-{rank_mode}-{dist}-{tokens}")
    ranks = tuple(rng.choice(MIXED_RANKS) for _ in range(tasks)) if rank_mode == "mixed" else (int(rank_mode),) * tasks
    if dist == "uniform" or tasks == 1:
        sizes = [tokens // tasks + (1 if p < tokens % tasks else 0) for p in range(tasks)]
    else:
        huge = tasks // 2
        others = [p for p in range(tasks) if p != huge]
        empty = set(rng.sample(others, tasks // 4))
        tiny_max = max(1, tokens // (8 * tasks))
        sizes = [0 if p in empty or p == huge else rng.randint(1, tiny_max) for p in range(tasks)]
        sizes[huge] = tokens - sum(sizes)
    return CaseSpec(tasks, rank_mode, dist, tokens, d_in, d_out, ranks, tuple(sizes))


@dataclass
class CaseTensors:
    """A case's leaves (x, A_p, B_p requiring grad), frozen base, output gradient and tables."""

    spec: CaseSpec
    x: torch.Tensor
    lora_A: list[torch.Tensor]
    lora_B: list[torch.Tensor]
    scalings: tuple[float, ...]
    base: torch.Tensor
    grad_out: torch.Tensor
    layout: SegmentLayout
    slots: LoraSlots
    offsets: torch.Tensor  # int32 (P,): cumulative segment ends, for torch._grouped_mm
    positions: torch.Tensor  # int64 (T,): row t's place in the (P * Lmax) padded buffer
    max_len: int

    @property
    def leaves(self) -> list[torch.Tensor]:
        return [self.x, *self.lora_A, *self.lora_B]


def make_tensors(spec: CaseSpec, dtype: torch.dtype, device: torch.device, seed: int) -> CaseTensors:
    """Random leaves scaled so outputs stay O(1), plus the layout and padding tables."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    d, o = spec.d_in, spec.d_out
    x = rand(spec.tokens, d).requires_grad_()
    lora_A = [rand(r, d, scale=d**-0.5).requires_grad_() for r in spec.ranks]
    lora_B = [rand(o, r, scale=r**-0.5).requires_grad_() for r in spec.ranks]
    scalings = tuple(2.0 if p % 2 else 0.5 for p in range(spec.tasks))
    max_len = max(spec.sizes)
    positions = [p * max_len + i for p, n in enumerate(spec.sizes) for i in range(n)]
    ends = [end for _, end, _ in spec.segments]
    return CaseTensors(
        spec=spec,
        x=x,
        lora_A=lora_A,
        lora_B=lora_B,
        scalings=scalings,
        base=rand(spec.tokens, o),
        grad_out=rand(spec.tokens, o),
        layout=SegmentLayout.build(spec.segments, spec.tokens, spec.tasks, device),
        slots=LoraSlots.build(spec.ranks, scalings, device),
        offsets=torch.tensor(ends, dtype=torch.int32, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        max_len=max_len,
    )


def run_segmented(c: CaseTensors) -> torch.Tensor:
    """`segmented_lora` with the fused base add."""
    return segmented_lora(c.x, c.lora_A, c.lora_B, c.layout, c.slots, base_TO=c.base)


def run_loop(c: CaseTensors) -> torch.Tensor:
    """A torch matmul pair per task on its rows, added into a copy of the base."""
    y = c.base.clone()
    for (start, end, p), a, b, s in zip(c.spec.segments, c.lora_A, c.lora_B, c.scalings):
        if end > start:
            y[start:end] += (c.x[start:end] @ a.T) @ b.T * s
    return y


def _padded_weights(c: CaseTensors, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A as (P, R, D) and s * B as (P, O, R), ranks zero-padded to the largest (rounded up to `multiple`)."""
    rank = -(-max(c.spec.ranks) // multiple) * multiple
    a_pad = torch.stack([F.pad(a, (0, 0, 0, rank - a.shape[0])) for a in c.lora_A])
    b_pad = torch.stack([F.pad(b * s, (0, rank - b.shape[1])) for b, s in zip(c.lora_B, c.scalings)])
    return a_pad, b_pad


def run_padded(c: CaseTensors) -> torch.Tensor:
    """Rows padded to (P, Lmax, D), ranks to the largest, one `torch.bmm` pair."""
    spec = c.spec
    a_pad, b_pad = _padded_weights(c)
    x_pad = c.x.new_zeros(spec.tasks * c.max_len, spec.d_in).index_copy(0, c.positions, c.x)
    h = torch.bmm(x_pad.view(spec.tasks, c.max_len, spec.d_in), a_pad.transpose(1, 2))
    y_pad = torch.bmm(h, b_pad.transpose(1, 2)).view(spec.tasks * c.max_len, spec.d_out)
    return c.base + y_pad.index_select(0, c.positions)


def run_grouped(c: CaseTensors) -> torch.Tensor:
    """`torch._grouped_mm` over the unpadded rows (offsets = segment ends), ranks padded to a multiple of 8."""
    a_pad, b_pad = _padded_weights(c, multiple=8)
    h = torch._grouped_mm(c.x, a_pad.transpose(1, 2), offs=c.offsets)
    return c.base + torch._grouped_mm(h, b_pad.transpose(1, 2), offs=c.offsets)


RUNNERS: dict[str, Callable[[CaseTensors], torch.Tensor]] = {
    "segmented": run_segmented,
    "loop": run_loop,
    "padded": run_padded,
    "grouped_mm": run_grouped,
}


def grouped_mm_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `torch._grouped_mm` does not apply here (None when it may: the call itself is the last test)."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return "torch._grouped_mm on CUDA needs bf16"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 9:
            return f"torch._grouped_mm needs CUDA capability >= 9.0, this GPU has {major}.{minor}"
    return None


def forward_backward(c: CaseTensors, run: Callable[[CaseTensors], torch.Tensor]) -> list[torch.Tensor]:
    """y, then the gradients of every leaf (zeros for a task without rows)."""
    y = run(c)
    grads = torch.autograd.grad(y, c.leaves, c.grad_out, allow_unused=True, materialize_grads=True)
    return [y, *grads]


TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 5e-3}
"""Relative tolerance (and absolute, times the reference's largest magnitude) of the checks."""


def check_against(reference: list[torch.Tensor], results: list[torch.Tensor], dtype: torch.dtype) -> None:
    """`torch.testing.assert_close` of y and every gradient; the message names the tensor."""
    names = ["y", "dx"] + [f"d{w}[{p}]" for w in "AB" for p in range((len(reference) - 2) // 2)]
    tol = TOLERANCE[dtype]
    for name, ref, got in zip(names, reference, results):
        scale = ref.abs().max().item() if ref.numel() else 1.0
        torch.testing.assert_close(
            got.float(), ref.float(), rtol=tol, atol=tol * max(scale, 1e-6), msg=lambda m, n=name: f"{n}: {m}"
        )
