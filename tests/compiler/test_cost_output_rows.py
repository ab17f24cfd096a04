"""The cost model's last layer: its GEMMs past attention run on the target tokens only."""

from __future__ import annotations

import pytest

from muxtune.compiler.cost.devices import device_spec
from muxtune.compiler.cost.load import SegmentLoad
from muxtune.compiler.cost.model import CostModel
from muxtune.compiler.cost.shapes import model_shape, task_shapes
from muxtune.runtime.models import BackboneConfig, build_model
from muxtune.runtime.tracing import trace_backbone
from muxtune.specs import LoraSpec

HIDDEN, INTERMEDIATE, KV_WIDTH = 64, 160, 32
CONFIG = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def cost_model(device: str = "cpu") -> CostModel:
    config = BackboneConfig.from_hf_dict(CONFIG)
    model = build_model(config, device="meta")
    shape = model_shape(config, trace_backbone(model, head=False), model, "fp32")
    tasks = task_shapes(model, {"t": LoraSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj"))}, 3)
    return CostModel(shape, tasks, device_spec(device), "fp32")


def test_the_weights_past_attention_are_o_proj_and_the_mlp() -> None:
    shape = cost_model().model
    assert shape.layer_matmul_params == 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_WIDTH + 3 * HIDDEN * INTERMEDIATE
    assert shape.output_matmul_params == HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE


@pytest.mark.parametrize("backward", [False, True])
def test_the_last_layer_costs_less_the_fewer_tokens_are_scored(backward: bool) -> None:
    cost = cost_model()
    scored = {"t": SegmentLoad(tokens=4096.0, sequences=16.0, target_tokens=4096.0, squared_tokens=16 * 256.0**2)}
    unscored = {"t": SegmentLoad(tokens=4096.0, sequences=16.0, target_tokens=0.0, squared_tokens=16 * 256.0**2)}
    whole = cost.layers_seconds(3, scored, backward)
    assert cost.layers_seconds(3, scored, backward, last=True) == pytest.approx(whole)
    saved = whole - cost.layers_seconds(3, unscored, backward, last=True)
    one_layer = whole - cost.layers_seconds(2, scored, backward)
    assert 0 < saved < one_layer
