"""The backbone's element-wise chains (RMSNorm, gated SiLU, rotary positions) and the loss's
log-softmax as one fused CPU kernel each, forward and backward, with torch's eager operators
everywhere the kernels do not apply.

Each function here computes what its eager chain computes (Hugging Face's numerics: RMSNorm's
statistics in fp32, every intermediate the chain stores rounded to the tensors' dtype). On the
CPU, for contiguous bf16 or fp32 tensors and frozen weights, it runs `cpu_fused.c` instead
(`cpu_build.library`): one pass over memory instead of three to eight, and backward keeps only
the inputs (eager RMSNorm keeps an fp32 copy of its input, eager SiLU its output).
The kernels may differ from eager in the last bit of an fp32 intermediate, so a result can
differ by one rounding of the tensors' dtype; they are deterministic and each row's result is
independent of the rest of the batch, so fused and alone training stay equal.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpu_build import library

SUFFIXES = {torch.bfloat16: "bf16", torch.float32: "f32"}
GRAIN = 1 << 16
"""Elements per thread below which a kernel call is not split among the intra-op threads."""


def fused_applies(*tensors: Tensor) -> bool:
    """Whether the CPU kernels run for these tensors: all on the CPU, of one dtype they cover
    (bf16 or fp32), with the library available."""
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in SUFFIXES:
        return False
    if any(t.device.type != "cpu" or t.dtype != first.dtype for t in tensors[1:]):
        return False
    return library() is not None


def _kernel(name: str, dtype: torch.dtype) -> Callable[..., None]:
    return getattr(library(), f"{name}_{SUFFIXES[dtype]}")


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="muxtune-fused")


def split_rows(rows: int, row_elements: int, call: Callable[[int, int], None], align: int = 1) -> None:
    """`call(begin, end)` over row ranges covering [0, rows): on this thread alone, or split among
    this thread's intra-op thread count when the work is large (the kernels release the GIL).
    Ranges start at multiples of ``align``."""
    blocks = -(-rows // align)
    threads = min(torch.get_num_threads(), blocks, max(1, rows * row_elements // GRAIN))
    if threads <= 1:
        call(0, rows)
        return
    _run_ranges([min(rows, align * (blocks * i // threads)) for i in range(threads + 1)], call)


def split_costs(costs: Sequence[int], grain: int, call: Callable[[int, int], None]) -> None:
    """`call(begin, end)` over ranges of items covering [0, len(costs)), split among this
    thread's intra-op threads into ranges of about equal summed cost (at least `grain` each)."""
    total = sum(costs)
    threads = min(torch.get_num_threads(), len(costs), max(1, total // grain))
    if threads <= 1:
        call(0, len(costs))
        return
    bounds, running = [0], 0
    for index, cost in enumerate(costs):
        running += cost
        if running * threads >= total * len(bounds) and len(bounds) < threads:
            bounds.append(index + 1)
    bounds.append(len(costs))
    _run_ranges(bounds, call)


def _run_ranges(bounds: list[int], call: Callable[[int, int], None]) -> None:
    """`call` over consecutive ranges of `bounds`: the first on this thread, the rest on the pool."""
    pool = _pool()
    futures = [pool.submit(call, begin, end) for begin, end in zip(bounds[1:-1], bounds[2:])]
    call(bounds[0], bounds[1])
    for future in futures:
        future.result()


def row_at(tensor: Tensor, row: int, row_elements: int) -> int:
    """The address of row ``row`` of a contiguous tensor of ``row_elements`` per row."""
    return tensor.data_ptr() + row * row_elements * tensor.element_size()


def _rowwise(name: str, operands: tuple[Tensor, ...], *extra: float) -> None:
    """Run kernel `name` over the rows of its [rows, cols] operands (the first sets the shape);
    1-D operands are passed whole to every row range. The kernel's arguments are (operands...,
    rows, cols, *extra)."""
    rows, cols = operands[0].shape
    kernel = _kernel(name, operands[0].dtype)

    def call(begin: int, end: int) -> None:
        pointers = [row_at(t, begin, cols) if t.dim() == 2 else t.data_ptr() for t in operands]
        kernel(*pointers, end - begin, cols, *extra)

    split_rows(rows, cols, call)


class _RmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = torch.empty_like(rows)
        _rowwise("rms_norm_forward", (rows, weight, out), eps)
        ctx.save_for_backward(rows, weight)
        ctx.eps = eps
        return out.view(x.shape)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        rows, weight = ctx.saved_tensors
        grad_x = torch.empty_like(rows)
        _rowwise("rms_norm_backward", (rows, weight, grad_out.reshape(rows.shape).contiguous(), grad_x), ctx.eps)
        return grad_x.view(grad_out.shape), None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` with the statistics in fp32
    (Hugging Face's RMSNorm); fused where `fused_applies` and the weight is frozen."""
    if not weight.requires_grad and fused_applies(x, weight):
        return _RmsNorm.apply(x.contiguous(), weight.contiguous(), float(eps))
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


class _SiluAndMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: Tensor, up: Tensor) -> Tensor:
        out = torch.empty_like(gate)
        _rowwise("swiglu_forward", (gate, up, out))
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor]:
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        _rowwise("swiglu_backward", (gate, up, grad_out.contiguous(), grad_gate, grad_up))
        return grad_gate, grad_up


def silu_and_mul(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` (the gated MLP's product), fused where `fused_applies`."""
    if gate.shape == up.shape and gate.dim() >= 1 and fused_applies(gate, up):
        rows_gate = gate.contiguous().view(-1, gate.shape[-1])
        rows_up = up.contiguous().view(-1, up.shape[-1])
        return _SiluAndMul.apply(rows_gate, rows_up).view(gate.shape)
    return F.silu(gate) * up


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        out = torch.empty_like(x)
        _rotary_call("rotary_forward", x, cos, sin, out)
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        grad = grad_out.contiguous()
        grad_x = torch.empty_like(grad)
        _rotary_call("rotary_backward", grad, cos, sin, grad_x)
        return grad_x, None, None


def _rotary_call(name: str, x: Tensor, cos: Tensor, sin: Tensor, out: Tensor) -> None:
    tokens, heads, dim = x.shape
    kernel = _kernel(name, x.dtype)
    row = heads * dim

    def call(b: int, e: int) -> None:
        kernel(row_at(x, b, row), row_at(cos, b, dim), row_at(sin, b, dim), row_at(out, b, row), e - b, heads, dim)

    split_rows(tokens, row, call)


def rotary(x_THD: Tensor, cos_TD: Tensor, sin_TD: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` for x [T, H, D] and tables [T, D] broadcast over heads;
    fused where `fused_applies`."""
    tables_fit = x_THD.dim() == 3 and cos_TD.shape == (x_THD.shape[0], x_THD.shape[2]) == sin_TD.shape
    if tables_fit and x_THD.shape[-1] % 2 == 0 and fused_applies(x_THD, cos_TD, sin_TD):
        return _Rotary.apply(x_THD.contiguous(), cos_TD.contiguous(), sin_TD.contiguous())
    cos, sin = cos_TD.unsqueeze(1), sin_TD.unsqueeze(1)
    return x_THD * cos + _rotate_half(x_THD) * sin


def cross_entropy_rows(
    logits_NV: Tensor, targets_N: Tensor, scale: float, with_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """(each row's log-probability of its target [N] in fp32, the logits' gradient of ``scale`` x
    the summed negative log-likelihood in the logits' dtype, or None without ``with_grad``), as
    ``log_softmax(logits.float())`` and its backward compute them, in one pass for the first and
    one more for the second: no fp32 copy of the logits, their log-probabilities or their gradient.
    For CPU logits where `fused_applies` and CPU int64 targets in range (the caller checks)."""
    rows, vocab = logits_NV.shape
    logits = logits_NV.contiguous()
    targets = targets_N.to(torch.int64).contiguous()
    picked = torch.empty(rows, dtype=torch.float32)
    grad = torch.empty_like(logits) if with_grad else None
    kernel = _kernel("cross_entropy", logits.dtype)

    def call(b: int, e: int) -> None:
        grad_at = row_at(grad, b, vocab) if grad is not None else None
        kernel(row_at(logits, b, vocab), row_at(targets, b, 1), row_at(picked, b, 1), grad_at, scale, e - b, vocab)

    split_rows(rows, vocab, call)
    return picked, grad
