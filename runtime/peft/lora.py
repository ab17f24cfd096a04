"""LoRA (and rsLoRA): the parallel attachment kind, `y = base(x) + s * B(A(dropout(x)))`; DoRA
(`use_dora`) is in `dora.py`, attached and saved through this entry."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from muxtune.kernels import LoraSlots, SegmentLayout, cpu_lora, current_stream_id, segmented_lora, segmented_path
from muxtune.kernels.dropout import draw_seed, seeded_dropout
from muxtune.specs import LoraSpec

from ..sharding import full_features
from .base import AttachmentKind, OperatorPeftModule, uniform_init_
from .registry import (
    AdapterFiles,
    AttachContext,
    ExportContext,
    PeftMethod,
    attach_operator_modules,
    module_list,
    positive_int_field,
    positive_number_field,
    prefixed_tensors,
    targeted_anchors,
    unprefixed_state,
)


@dataclass(frozen=True)
class LoraConfig:
    """One task's LoRA hyperparameters (peft's names in comments)."""

    r: int
    alpha: float  # lora_alpha
    dropout: float = 0.0  # lora_dropout
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) for rsLoRA (peft's definition)."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoraModule(OperatorPeftModule):
    """Low-rank update of a linear operator; parameter names follow peft (`lora_A`, `lora_B`)."""

    kind = AttachmentKind.PARALLEL

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: LoraConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.config = config
        self.scaling = config.scaling
        self.lora_A = nn.Linear(in_features, config.r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(config.r, out_features, bias=False, dtype=dtype, device=device)
        self.dropout_generator: torch.Generator | None = None

    def reset_parameters(self, generator: torch.Generator) -> None:
        """peft's default init: A ~ kaiming_uniform(a=sqrt(5)), B = 0, drawn from `generator`."""
        fan_in = self.lora_A.weight.shape[1]
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform with a=sqrt(5) reduces to this
        with torch.no_grad():
            uniform_init_(self.lora_A.weight, bound, generator)
            self.lora_B.weight.zero_()

    def dropout(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Inverted dropout of ``x.to(dtype)`` (default: x's dtype) with a mask seeded from the
        task's own generator, so a task's masks never depend on other tasks (and are restored
        with the task's checkpoint); `muxtune.kernels.dropout` says how the mask is made."""
        dtype = x.dtype if dtype is None else dtype
        p = self.config.dropout
        if p == 0.0 or not self.training:
            return x.to(dtype)
        assert self.dropout_generator is not None, "attach_task sets the task's dropout generator"
        return seeded_dropout(x, p, draw_seed(self.dropout_generator), dtype)

    def shard_dims(self, style: str) -> dict[str, int | None] | None:
        """Column-parallel host: B's rows split, A whole; row-parallel: A's columns split, B whole
        (its partial products are summed with the host's partial outputs)."""
        if style == "column":
            return {"lora_B.weight": 0, "lora_A.weight": None}
        return {"lora_A.weight": 1, "lora_B.weight": None}

    def adapt(self, x: torch.Tensor, y: torch.Tensor, host: nn.Module) -> torch.Tensor:
        """peft's `y + B(A(dropout(x))) * s`, added in the adapter's dtype and rounded once (see
        `ParallelLora`)."""
        weight_A = self.lora_A.weight
        if self.config.dropout != 0.0 and self.training:
            x = self.dropout(x, weight_A.dtype)
        return ParallelLora.apply(x, y, weight_A, self.lora_B.weight, self.scaling)

    @classmethod
    def adapt_pieces(
        cls, x_TI: torch.Tensor, y_TO: torch.Tensor, sizes: list[int], modules: list[OperatorPeftModule | None]
    ) -> torch.Tensor | None:
        """All tasks' segments in one `segmented_lora` call (Triton on CUDA: one launch per
        product for every task, each at its own rank), where `segmented_path` says so; DoRA
        and adapters of mixed dtypes keep the per-segment path. The segment table is built on
        the host and copied once per distinct layout (`_segment_layout`)."""
        if not segmented_path(x_TI):
            return None
        slotted: list[LoraModule] = []  # a layout holds one segment per task: one slot per piece adapted
        segments: list[tuple[int, int, int]] = []
        start = 0
        for size, module in zip(sizes, modules):
            if module is not None:
                segments.append((start, start + size, len(slotted)))
                slotted.append(module)
            start += size
        if any(type(m) is not LoraModule for m in slotted):
            return None
        dtype = slotted[0].lora_A.weight.dtype
        if any(m.lora_A.weight.dtype != dtype or m.lora_B.weight.dtype != dtype for m in slotted):
            return None
        if any(m.config.dropout != 0.0 and m.training for m in slotted):
            pieces = x_TI.split(sizes)
            x_TI = torch.cat([x.to(dtype) if m is None else m.dropout(x, dtype) for m, x in zip(modules, pieces)])
        device, stream = x_TI.device, current_stream_id(x_TI.device)
        layout = _segment_layout(tuple(segments), x_TI.shape[0], len(slotted), device, stream)
        slots = _lora_slots(tuple(m.config.r for m in slotted), tuple(m.scaling for m in slotted), device, stream)
        weights_A = [m.lora_A.weight for m in slotted]
        weights_B = [m.lora_B.weight for m in slotted]
        return segmented_lora(x_TI, weights_A, weights_B, layout, slots, y_TO)


LAYOUT_CACHE_SIZE = 256
"""Segment tables kept: a micro-batch asks once per host, with the same few task sets. Tables
are kept per CUDA stream (the `stream` argument, only a cache key): each is copied to the device
on the stream that first asks for it, so only that stream's work is ordered after the copy."""


@functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)
def _segment_layout(
    segments: tuple[tuple[int, int, int], ...], num_tokens: int, num_slots: int, device: torch.device, stream: int
) -> SegmentLayout:
    return SegmentLayout.build(segments, num_tokens, num_slots, device)


@functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)
def _lora_slots(ranks: tuple[int, ...], scalings: tuple[float, ...], device: torch.device, stream: int) -> LoraSlots:
    return LoraSlots.build(ranks, scalings, device)


class ParallelLora(torch.autograd.Function):
    """`(y.to(w) + s * (x.to(w) @ A^T) @ B^T).to(y.dtype)` for the adapter's dtype w, with the
    operators autograd would run for that expression, forward and backward, so results are
    bitwise the same, except that the products with a rank-wide output run in the orientation
    BLAS is fastest at on the CPU (`narrow_mm`: the same sums in another order); what differs
    besides is what is kept and copied. Backward recasts the input
    instead of keeping its copy in w (the input itself is usually kept anyway, and shared by
    every anchor reading it: ~13 KB less per token and layer for a 7-target task on a bf16
    backbone), and passes the output's gradient to `y` as it is (the round trip through w is
    exact) instead of casting it twice.

    For bf16 activations and fp32 adapters on the CPU the six products run on
    `muxtune.kernels.cpu_lora` instead: the same fp32 arithmetic on the bf16 values, read and
    written without fp32 copies, the sums in their own order. With dropout the input arrives as
    dropout's fp32 copy: its two products (x @ A^T and grad_h^T @ x) then run on BLAS and the
    other four on the kernels."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, y: torch.Tensor, weight_A: torch.Tensor, weight_B: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        ctx.scaling = scaling
        ctx.on_kernels = cpu_lora.lora_kernels_apply(x, y, weight_A, weight_B)
        if ctx.on_kernels:
            h = cpu_lora.rows_dot(x, weight_A) if x.dtype == torch.bfloat16 else narrow_mm(x, weight_A.t())
            weight_B_t = weight_B.t().contiguous()
            ctx.save_for_backward(x, h, weight_A, weight_B_t)
            return cpu_lora.expand(h, weight_B_t, y, scaling)
        h = narrow_mm(x.to(weight_A.dtype), weight_A.t())
        out = torch.addmm(y.to(h.dtype), h, weight_B.t(), alpha=scaling).to(y.dtype)
        ctx.save_for_backward(x, h, weight_A, weight_B)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.on_kernels:
            return _kernel_backward(ctx, grad_out)
        x, h, weight_A, weight_B = ctx.saved_tensors
        need_x, need_y, need_A, need_B = ctx.needs_input_grad[:4]
        scaling = ctx.scaling
        grad = grad_out.to(h.dtype)
        grad_x = grad_y = grad_A = grad_B = None
        if need_y:
            grad_y = grad_out
        if need_B:
            grad_B = _times(narrow_mm(grad.t(), h), scaling)
        if need_x or need_A:
            grad_h = _times(narrow_mm(grad, weight_B), scaling)
            if need_x:
                grad_x = grad_h.mm(weight_A).to(x.dtype)
            if need_A:
                grad_A = grad_h.t().mm(x.to(weight_A.dtype))
        return grad_x, grad_y, grad_A, grad_B, None


def _kernel_backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """`ParallelLora`'s backward on `cpu_lora`'s kernels (B saved transposed, [r, out])."""
    x, h, weight_A, weight_B_t = ctx.saved_tensors
    need_x, need_y, need_A, need_B = ctx.needs_input_grad[:4]
    scaling = ctx.scaling
    grad = grad_out.contiguous()
    grad_x = grad_A = grad_B = None
    if need_B:
        grad_B = cpu_lora.outer(grad, h, scaling).t().contiguous()
    if need_x or need_A:
        grad_h = cpu_lora.rows_dot(grad, weight_B_t, scaling)
        on_bf16 = x.dtype == torch.bfloat16
        if need_x:
            grad_x = cpu_lora.expand(grad_h, weight_A, None) if on_bf16 else grad_h.mm(weight_A)
        if need_A:
            grad_A = cpu_lora.outer(x, grad_h) if on_bf16 else grad_h.t().mm(x)
    return grad_x, grad_out if need_y else None, grad_A, grad_B, None


VECTOR_FLOATS = 16
"""fp32 lanes of an AVX-512 register: BLAS's CPU kernels are fast for outputs whose width is a multiple."""


def narrow_mm(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right`` for an output a LoRA rank wide. On the CPU, BLAS's kernels for an output
    whose width is not a multiple of `VECTOR_FLOATS` (ranks 2-15, 24, ...) are 1.2-6x slower than
    the same product transposed, ``(right^T @ left^T)^T``, which sums the same terms in another
    order; there (and for no other width, so the choice depends only on the rank) it runs
    transposed. Width 1 stays a matrix-vector product."""
    width = right.shape[1]
    if left.device.type == "cpu" and width > 1 and width % VECTOR_FLOATS != 0:
        return right.t().mm(left.t()).t()
    return left.mm(right)


def _times(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor * factor`` as autograd scales a product's gradient by `addmm`'s alpha (no-op at 1)."""
    return tensor if factor == 1 else tensor * factor


MAGNITUDE = "lora_magnitude_vector"
"""DoRA's magnitude: our state key is `<anchor>.lora_magnitude_vector.weight` (peft's parameter
name), peft's files store it as `<anchor>.lora_magnitude_vector`."""


def peft_tensor_key(key: str) -> str:
    """A state key as peft saves it (DoRA's magnitude without its `.weight`)."""
    suffix = f".{MAGNITUDE}.weight"
    return key[: -len(".weight")] if key.endswith(suffix) else key


def state_key(key: str) -> str:
    """A saved peft key (prefix dropped) as our state key (DoRA's magnitude gets its `.weight`)."""
    return key + ".weight" if key.endswith(f".{MAGNITUDE}") else key


def lora_config(spec: LoraSpec) -> LoraConfig:
    """The module hyperparameters of a LoRA spec."""
    return LoraConfig(r=spec.r, alpha=float(spec.alpha), dropout=spec.dropout, use_rslora=spec.use_rslora)


def attach_lora(spec: LoraSpec, ctx: AttachContext) -> dict[str, nn.Module]:
    """One LoRA (or, with `use_dora`, DoRA) module per targeted linear operator."""
    from .dora import DoraModule, host_fan_in_fan_out, initial_magnitude  # dora.py builds on this module

    config = lora_config(spec)

    def build(_: str, host: nn.Module) -> LoraModule:
        if not spec.use_dora:
            return LoraModule(*full_features(host), config, dtype=ctx.dtype, device=ctx.device)
        fan_in_fan_out = host_fan_in_fan_out(host)
        magnitude = initial_magnitude(host, fan_in_fan_out, ctx.dtype, ctx.device)
        return DoraModule(
            *full_features(host),
            config,
            magnitude,
            fan_in_fan_out=fan_in_fan_out,
            dtype=ctx.dtype,
            device=ctx.device,
        )

    return attach_operator_modules(ctx, targeted_anchors(ctx.model, spec.target_modules), build)


def export_lora(spec: LoraSpec, state: Mapping[str, torch.Tensor], ctx: ExportContext) -> AdapterFiles:
    """peft's LoraConfig fields and saved keys."""
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": ctx.base_model,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.use_rslora,
        "use_dora": spec.use_dora,
        "target_modules": sorted(spec.target_modules),
        "bias": "none",
        "fan_in_fan_out": ctx.fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    return config, prefixed_tensors({peft_tensor_key(key): value for key, value in state.items()})


def load_lora(raw: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> tuple[LoraSpec, dict]:
    """A peft LoRA (rsLoRA, DoRA) directory's config and state."""
    r = positive_int_field(raw, "r", path)
    alpha = positive_number_field(raw, "lora_alpha", path)
    spec = LoraSpec(
        r=r,
        alpha=alpha,
        dropout=float(raw.get("lora_dropout") or 0.0),
        target_modules=module_list(raw, "target_modules", path),
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
    )
    return spec, {state_key(key): value for key, value in unprefixed_state(tensors, path).items()}


LORA = PeftMethod(
    name="lora",
    spec_type=LoraSpec,
    peft_types=("LORA",),
    attach=attach_lora,
    export=export_lora,
    load=load_lora,
)
