"""The cost model's weight reads: on a CPU every GEMM call re-reads its weights before its FLOPs
(once per micro-batch, whatever its size), so a micro-batch split in two reads every weight once
more; a GPU's GEMMs are a roofline, with no such term."""

from __future__ import annotations

import dataclasses

import pytest
from test_cost_output_rows import cost_model

from muxtune.compiler.cost.devices import CPU_WEIGHT_READ_BANDWIDTH
from muxtune.compiler.cost.load import SegmentLoad
from muxtune.compiler.cost.model import CostModel

WHOLE = SegmentLoad(tokens=1024.0, sequences=8.0, target_tokens=64.0, squared_tokens=8 * 128.0**2)
HALF = WHOLE.scaled(0.5)
LAYERS = 3


def without_reads(cost: CostModel) -> CostModel:
    device = dataclasses.replace(cost.device, weight_read_bandwidth=None)
    return CostModel(cost.model, cost.tasks, device, cost.dtype)


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("load", [WHOLE, HALF])
def test_each_micro_batch_reads_every_layer_weight_once_on_a_cpu(backward: bool, load: SegmentLoad) -> None:
    cost = cost_model("cpu")
    read = LAYERS * cost.model.layer_matmul_params * cost.model.dtype_bytes / CPU_WEIGHT_READ_BANDWIDTH
    extra = cost.layers_seconds(LAYERS, {"t": load}, backward) - without_reads(cost).layers_seconds(
        LAYERS, {"t": load}, backward
    )
    assert extra == pytest.approx(read), "the same read for any number of tokens"


@pytest.mark.parametrize("load", [WHOLE, HALF])
def test_each_micro_batch_loss_reads_the_head_forward_and_backward_on_a_cpu(load: SegmentLoad) -> None:
    cost = cost_model("cpu")
    head = 2 * cost.model.head_params * cost.model.dtype_bytes / CPU_WEIGHT_READ_BANDWIDTH
    assert cost.head_read_seconds() == pytest.approx(head)
    extra = cost.loss_seconds({"t": load}) - without_reads(cost).loss_seconds({"t": load})
    assert extra == pytest.approx(head)
    assert cost.loss_seconds({"t": dataclasses.replace(load, target_tokens=0.0)}) == 0.0, "no head without targets"


def test_a_gpu_has_no_weight_read_term() -> None:
    cost = cost_model("h100")
    assert cost.weight_read_seconds(1e9) == 0.0 and cost.head_read_seconds() == 0.0
