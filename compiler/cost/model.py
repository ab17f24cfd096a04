"""The cost model: time and memory of a micro-batch's pass through a span of the backbone, its
loss, a task's optimizer step, transfers and all-reduces, as functions of what the micro-batch
carries (tokens, sequences, target tokens and squared sequence lengths per task).

Time is an eager roofline: per operator issued, a fixed overhead; per GEMM, the larger of its
FLOPs over the device's GEMM rate and its weight bytes over memory bandwidth; per element-wise
pass, its bytes over bandwidth; attention per sequence (scores and values, plus one call's
overhead per sequence); PEFT modules per task segment. Every term is linear in the tokens of
each task but for the GEMMs' max, which is what makes fusing tasks pay on a weight-bound device.
A measured profile (`muxtune-profile`) replaces the device's rates and scales each component so
the model reproduces the measured times."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from muxtune.runtime.backbone import DTYPES
from muxtune.runtime.loss import PACKED_HEAD_COPIES, chunk_rows, packs_head

from .devices import DeviceSpec
from .load import MicroBatchLoad, SegmentLoad, total_tokens
from .shapes import ModelShape, TaskShape

COMPONENTS = ("layers_forward", "layers_backward", "loss", "optimizer")

_ADAPTER_BYTES = 4
"""PEFT parameters, gradients and AdamW moments are fp32."""
_OPS_PER_ANCHOR = (6, 12)
"""Eager operators one task's module issues at one host, forward and backward."""
_OPS_PER_SEQUENCE = (6, 10)
"""Operators attention issues per sequence per layer, forward and backward (slices, products, softmax)."""
_ELEMENTWISE_PASSES = (14, 28)
"""Hidden-width tensors read or written per token by a layer's element-wise work (norms,
RoPE, residual adds, activations), forward and backward."""
_LOSS_OPS = 25
_OPTIMIZER_OPS_PER_TENSOR = 14
_OPTIMIZER_PASSES = 16
"""fp32 values read or written per trainable parameter by clipping and AdamW."""
_SOFTMAX_BYTES = 4
"""CPU attention's softmax runs in fp32 (transformers' eager numerics) and keeps its output."""
_ACTIVATION_MARGIN = 1.35
"""What autograd, casts and the allocator keep beyond the analytic count of saved tensors:
measured on tiny-llama (fp32, three tasks, 48-sequence batches), the process's peak grew by
1.32x the modelled activations between a 1- and a 2-micro-batch plan."""
_LOAD_SECONDS_PER_SEQUENCE = 40e-6
"""Host-side packing of one sequence into a micro-batch layout."""


@dataclass(frozen=True)
class Calibration:
    """Multipliers fitted to a profile, per component (1.0: the analytic model as is)."""

    layers_forward: float = 1.0
    layers_backward: float = 1.0
    loss: float = 1.0
    optimizer: float = 1.0


@dataclass(frozen=True)
class LayerTerms:
    """One decoder layer's time on one tensor-parallel shard, split the way the solver needs
    it: ``fixed`` per call, ``max(gemm_seconds_per_token * n, weight_seconds)`` for the GEMMs,
    ``seconds_per_token`` for the rest of the shared work, and ``task(load)`` for a task's own
    (attention of its sequences, its PEFT modules)."""

    fixed: float
    gemm_seconds_per_token: float
    weight_seconds: float
    seconds_per_token: float


class CostModel:
    """Costs of one job's backbone and tasks on one device type (per tensor-parallel shard)."""

    def __init__(
        self,
        model: ModelShape,
        tasks: Mapping[str, TaskShape],
        device: DeviceSpec,
        dtype: str,
        *,
        tensor_parallel: int = 1,
        calibration: Calibration = Calibration(),
    ) -> None:
        self.model = model
        self.tasks = dict(tasks)
        self.device = device
        self.dtype = dtype
        self.tensor_parallel = tensor_parallel
        self.calibration = calibration
        self.flops = device.flops(dtype)
        self.bandwidth = device.memory_bandwidth
        self.overhead = device.op_overhead_seconds
        self.packed_head_copies = PACKED_HEAD_COPIES if packs_head(device.kind, DTYPES[dtype]) else 0

    def with_tensor_parallel(self, degree: int) -> CostModel:
        """The same model for shards of ``degree``-way tensor parallelism."""
        return CostModel(
            self.model, self.tasks, self.device, self.dtype, tensor_parallel=degree, calibration=self.calibration
        )

    def with_calibration(self, calibration: Calibration) -> CostModel:
        """The same model with other component multipliers."""
        return CostModel(
            self.model,
            self.tasks,
            self.device,
            self.dtype,
            tensor_parallel=self.tensor_parallel,
            calibration=calibration,
        )

    # -- time -------------------------------------------------------------------------------

    def _scale(self, backward: bool) -> float:
        return self.calibration.layers_backward if backward else self.calibration.layers_forward

    def layer_terms(self, backward: bool) -> LayerTerms:
        """The shared part of one layer's forward (or input-gradient backward) on a shard."""
        m, tp, b = self.model, self.tensor_parallel, self.model.dtype_bytes
        scale = self._scale(backward)
        comm_per_token = 0.0
        comm_fixed = 0.0
        if tp > 1:
            per_token_bytes = 2 * m.hidden * b * 2 * (tp - 1) / tp
            comm_per_token = per_token_bytes / self.device.link_bandwidth
            comm_fixed = 2 * self.device.link_latency_seconds
        passes = _ELEMENTWISE_PASSES[backward]
        weight_read = self.weight_read_seconds(m.layer_matmul_params / tp)
        return LayerTerms(
            fixed=scale * (m.layer_ops * (1.5 if backward else 1.0) * self.overhead + weight_read) + comm_fixed,
            gemm_seconds_per_token=scale * 2 * m.layer_matmul_params / tp / self.flops,
            weight_seconds=scale * m.layer_matmul_params * b / tp / self.bandwidth,
            seconds_per_token=scale * passes * m.hidden * b / self.bandwidth + comm_per_token,
        )

    def task_layer_seconds(self, task: str, segment: SegmentLoad, backward: bool) -> float:
        """One layer's work for one task's segment: attention over its sequences and its PEFT
        modules (a shard's share)."""
        if segment.tokens <= 0:
            return 0.0
        m, shape, tp = self.model, self.tasks[task], self.tensor_parallel
        factor = 2 if backward else 1
        keys = segment.squared_tokens + shape.extra_keys * segment.tokens
        attention = factor * 4 * m.attention_width / tp * keys / self.flops
        attention += factor * 3 * (m.num_heads / tp) * keys * m.dtype_bytes / self.bandwidth
        attention += _OPS_PER_SEQUENCE[backward] * segment.sequences * self.overhead
        peft = factor * 2 * shape.layer_params * segment.tokens / self.flops
        peft += shape.layer_anchors * _OPS_PER_ANCHOR[backward] * self.overhead
        return self._scale(backward) * (attention + peft)

    def layers_seconds(
        self, num_layers: int, load: MicroBatchLoad, backward: bool, edges: int = 0, *, last: bool = False
    ) -> float:
        """``num_layers`` decoder layers (plus ``edges`` operators outside them) forward or
        backward on the micro-batch; with ``last``, the span ends with the backbone's last layer,
        which runs its GEMMs past attention (and, counted alike, their share of the element-wise
        work) on the target tokens only."""
        if num_layers == 0 and edges == 0:
            return 0.0
        terms = self.layer_terms(backward)
        n = total_tokens(load)

        def shared(tokens: float) -> float:
            gemm = max(terms.gemm_seconds_per_token * tokens, terms.weight_seconds)
            return terms.fixed + gemm + terms.seconds_per_token * tokens

        own = sum(self.task_layer_seconds(t, s, backward) for t, s in sorted(load.items()))
        edge = self._scale(backward) * edges * (1.5 if backward else 1.0) * self.overhead
        total = num_layers * (shared(n) + own) + edge
        if last and num_layers:
            m = self.model
            unscored = max(0.0, n - sum(s.target_tokens for s in load.values()))
            total += shared(n - unscored * m.output_matmul_params / m.layer_matmul_params) - shared(n)
        return total

    def weight_read_seconds(self, params: float) -> float:
        """What a GEMM call spends reading ``params`` backbone weights before its FLOPs, on a
        device that does not overlap the two (`DeviceSpec.weight_read_bandwidth`; else 0)."""
        if self.device.weight_read_bandwidth is None:
            return 0.0
        return params * self.model.dtype_bytes / self.device.weight_read_bandwidth

    def head_read_seconds(self) -> float:
        """The output head's weight reads of one micro-batch's loss, forward and backward (once
        for all of its tasks: the head runs on their scored rows together)."""
        return self.calibration.loss * 2 * self.weight_read_seconds(self.model.head_params)

    def task_loss_seconds(self, task: str, segment: SegmentLoad) -> float:
        """The head and cross-entropy on the task's target tokens, forward and backward."""
        if segment.target_tokens <= 0:
            return 0.0
        m = self.model
        head = m.head_params  # whole on every tensor-parallel shard
        gemm = max(2 * head * segment.target_tokens / self.flops, head * m.dtype_bytes / self.bandwidth)
        softmax = 6 * m.vocab * 4 * segment.target_tokens / self.bandwidth
        return self.calibration.loss * (2 * gemm + softmax + _LOSS_OPS * self.overhead)

    def loss_seconds(self, load: MicroBatchLoad) -> float:
        """`LossBackward` on the micro-batch: every task's head and loss."""
        seconds = sum(self.task_loss_seconds(t, s) for t, s in sorted(load.items()))
        return seconds + self.head_read_seconds() if seconds else 0.0

    def optimizer_seconds(self, tasks: Sequence[str]) -> float:
        """Clip and step these tasks' optimizers."""
        total = 0.0
        for name in tasks:
            shape = self.tasks[name]
            params = shape.total_params / self.tensor_parallel
            total += _OPTIMIZER_OPS_PER_TENSOR * shape.param_tensors * self.overhead
            total += _OPTIMIZER_PASSES * _ADAPTER_BYTES * params / self.bandwidth
        return self.calibration.optimizer * total

    def load_batches_seconds(self, loads: Sequence[MicroBatchLoad]) -> float:
        """Draw and lay out an hTask's micro-batches on the host."""
        return _LOAD_SECONDS_PER_SEQUENCE * sum(s.sequences for load in loads for s in load.values())

    def concurrent_slowdown(self, streams: int) -> float:
        """How much longer each compute instruction takes while ``streams`` hTask streams share
        the device (1 for one stream)."""
        if streams <= 1:
            return 1.0
        return self.device.stream_slowdown * max(1.0, streams / self.device.parallel_streams)

    def transfer_seconds(self, load: MicroBatchLoad) -> float:
        """Send one boundary activation (or its gradient) to the next stage."""
        return self.device.link_latency_seconds + self.boundary_bytes(load) / self.device.link_bandwidth

    def all_reduce_seconds(self, tasks: Sequence[str], group_size: int) -> float:
        """Ring all-reduce of these tasks' gradients (fp32) over ``group_size`` replicas."""
        if group_size <= 1:
            return 0.0
        params = sum(self.tasks[t].total_params for t in tasks) * self._adapter_share()
        volume = 2 * (group_size - 1) / group_size * params * _ADAPTER_BYTES
        return 2 * (group_size - 1) * self.device.link_latency_seconds + volume / self.device.link_bandwidth

    # -- memory -----------------------------------------------------------------------------

    def boundary_bytes(self, load: MicroBatchLoad) -> int:
        """One hidden-state tensor of the micro-batch (what crosses a stage boundary)."""
        return int(total_tokens(load) * self.model.hidden * self.model.dtype_bytes)

    def layers_activation_bytes(self, num_layers: int, load: MicroBatchLoad) -> int:
        """What ``num_layers`` layers' forward keeps for the backward."""
        m, tp = self.model, self.tensor_parallel
        per_layer = m.layer_saved_elements * m.dtype_bytes / tp * total_tokens(load)
        for name, segment in sorted(load.items()):
            shape = self.tasks[name]
            per_layer += shape.layer_saved_elements * _ADAPTER_BYTES * segment.tokens
            if self.device.kind == "cpu":
                keys = segment.squared_tokens + shape.extra_keys * segment.tokens
                per_layer += (m.num_heads / tp) * keys * _saved_score_bytes(m.dtype_bytes)
        return int(_ACTIVATION_MARGIN * num_layers * per_layer)

    def loss_activation_bytes(self, load: MicroBatchLoad) -> int:
        """What the fused head and loss (`runtime.loss`) hold, for every task at once: the hidden
        states' gradient until backward, and one chunk's logits (in the dtype and fp32) and their
        gradient while it is worked out."""
        m = self.model
        targets = sum(s.target_tokens for s in load.values())
        rows = min(targets, chunk_rows(m.vocab))
        held = targets * m.hidden * m.dtype_bytes + rows * m.vocab * (m.dtype_bytes + 8)
        return int(_ACTIVATION_MARGIN * held)

    def weight_bytes(self, num_layers: int, first: bool, last: bool) -> int:
        """Backbone weights of a stage with ``num_layers`` layers (split over the tensor-parallel
        shards) and the embeddings when ``first``, the head when ``last`` (whole on every shard,
        with the packed copies the fused loss keeps where `packs_head`)."""
        m = self.model
        params = num_layers * m.layer_params / self.tensor_parallel
        if first:
            params += m.embed_params
        if last and not (first and m.tied_head):
            params += m.head_params
        if last:
            params += self.packed_head_copies * m.head_params
        return int(params * m.dtype_bytes)

    def adapter_bytes(self, tasks: Sequence[str], num_layers: int, edges: bool) -> int:
        """Parameters, gradients and AdamW moments (fp32) of these tasks' modules on a stage."""
        total = 0.0
        for name in tasks:
            shape = self.tasks[name]
            total += shape.layer_params * num_layers + (shape.edge_params if edges else 0)
        return int(4 * _ADAPTER_BYTES * total * self._adapter_share())

    def _adapter_share(self) -> float:
        """The share of a task's PEFT parameters one tensor-parallel shard holds: LoRA splits one
        of its two matrices at each split operator (of about equal size) and keeps the other whole."""
        return (1 + 1 / self.tensor_parallel) / 2

    def static_bytes(self, num_layers: int, first: bool, last: bool, tasks: Sequence[str]) -> int:
        """A rank's memory before any micro-batch: runtime, weights, every task's adapter state."""
        return (
            self.device.runtime_bytes
            + self.weight_bytes(num_layers, first, last)
            + self.adapter_bytes(tasks, num_layers, first or last)
        )


def replace_rates(
    device: DeviceSpec, dtype: str, *, flops: float, bandwidth: float, overhead: float, runtime: int
) -> DeviceSpec:
    """``device`` with measured rates for ``dtype``."""
    return dataclasses.replace(
        device,
        matmul_flops={**device.matmul_flops, dtype: flops},
        memory_bandwidth=bandwidth,
        op_overhead_seconds=overhead,
        runtime_bytes=runtime,
    )


def _saved_score_bytes(dtype_bytes: int) -> int:
    """Bytes CPU attention keeps per score for backward: the fp32 softmax output, plus its copy
    in the backbone's dtype (what the value product saw) when that dtype is narrower."""
    return _SOFTMAX_BYTES + (dtype_bytes if dtype_bytes < _SOFTMAX_BYTES else 0)
