"""The compiler's cost pass: the job's cost model from the device table, calibrated by a
measured profile when one is given and applies (same device kind; component multipliers only
when it was measured on this backbone in this dtype)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch.fx
from torch import nn

from muxtune.plans import TaskPlan
from muxtune.runtime.models import BackboneConfig
from muxtune.specs import LoraSpec

from ..errors import CompileError
from .devices import DeviceSpec, device_spec
from .load import SegmentLoad
from .model import Calibration, CostModel, replace_rates
from .profile import Measurement, Profile
from .shapes import model_shape, task_shapes

PROFILE_TASK = "profile-task"
"""The name the profile's measurement task goes by in the cost model."""


def build_cost_model(
    config: BackboneConfig,
    traced: torch.fx.GraphModule,
    meta_model: nn.Module,
    tasks: Sequence[TaskPlan],
    device: str,
    dtype: str,
    profile: Profile | None = None,
) -> CostModel:
    """The cost model of this backbone and these tasks on ``device`` (a device table name)."""
    spec = device_spec(device)
    shape = model_shape(config, traced, meta_model, dtype)
    specs = {t.name: t.peft for t in tasks}
    if profile is not None:
        specs[PROFILE_TASK] = LoraSpec(
            r=profile.lora_rank, alpha=2 * profile.lora_rank, target_modules=("q_proj", "v_proj")
        )
    shapes = task_shapes(meta_model, specs, config.num_layers)
    if profile is None:
        return CostModel(shape, shapes, spec, dtype)
    return calibrated(CostModel(shape, shapes, _with_profile_rates(spec, profile, dtype), dtype), profile, config)


def _with_profile_rates(spec: DeviceSpec, profile: Profile, dtype: str) -> DeviceSpec:
    kind = "cpu" if profile.device == "cpu" else "cuda"
    if kind != spec.kind:
        raise CompileError(
            [f"profile: measured on {profile.device}, the plan is for {spec.name}; profile the target device"]
        )
    if profile.dtype != dtype:
        raise CompileError(
            [f"profile: measured in {profile.dtype}, the job runs in {dtype}; profile with --dtype {dtype}"]
        )
    return replace_rates(
        spec,
        dtype,
        flops=profile.matmul_flops,
        bandwidth=profile.memory_bandwidth,
        overhead=profile.op_overhead_seconds,
        runtime=profile.runtime_bytes,
    )


def _predicted(cost: CostModel, m: Measurement) -> float:
    if m.component == "optimizer":
        return cost.optimizer_seconds([PROFILE_TASK])
    sequences = m.tokens / m.sequence_length
    segment = SegmentLoad(float(m.tokens), sequences, float(m.target_tokens), sequences * m.sequence_length**2)
    load = {PROFILE_TASK: segment}
    if m.component == "loss":
        return cost.loss_seconds(load)
    edges = sum(cost.model.edge_ops)
    return cost.layers_seconds(cost.model.num_layers, load, m.component == "layers_backward", edges)


def calibrated(cost: CostModel, profile: Profile, config: BackboneConfig) -> CostModel:
    """``cost`` with each component scaled by the median ratio of measured to modelled time
    (only when the profile measured this backbone)."""
    if profile.backbone != config.to_dict() or not profile.measurements:
        return cost
    scales = {}
    for component in ("layers_forward", "layers_backward", "loss", "optimizer"):
        ratios = [m.seconds / _predicted(cost, m) for m in profile.measurements if m.component == component]
        ratios = [r for r in ratios if r > 0]
        scales[component] = statistics.median(ratios) if ratios else 1.0
    return cost.with_calibration(Calibration(**scales))
