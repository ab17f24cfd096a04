"""Adapter files against peft: exported adapters load in peft and give our logits; fx tracing
with LoRA hosts attached; `init_from` round trip and adapter-file errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_cases import assert_peft_export_matches, hf_model, packed_inputs

from muxtune.runtime.adapters import AdapterError, load_adapter, save_adapter
from muxtune.runtime.engine import MultiTaskEngine, TaskTraining
from muxtune.runtime.models import load_backbone
from muxtune.runtime.peft import PeftHost
from muxtune.runtime.tracing import trace_backbone
from muxtune.specs import LoraSpec

FAMILY_TARGETS = {
    "llama_tied_gqa_bias": ("q_proj", "v_proj", "down_proj"),
    "qwen2_untied_gqa": ("k_proj", "o_proj", "gate_proj"),
    "gpt2": ("c_attn", "c_fc"),
    "opt_post_ln_proj": ("q_proj", "fc1", "out_proj"),
}


def engine_with_task(path: Path, targets: tuple[str, ...], rank: int = 4) -> tuple[MultiTaskEngine, str]:
    model, _ = load_backbone(path, torch.float32)
    engine = MultiTaskEngine(model)
    config = TaskTraining("task", LoraSpec("lora", rank, 2.0 * rank, 0.0, targets), lr=1e-3, steps=1)
    state = engine.add_task(config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in state.modules.values():
            module.lora_B.weight.copy_(0.2 * torch.randn(module.lora_B.weight.shape, generator=generator))
    return engine, "task"


@pytest.mark.parametrize("case", list(FAMILY_TARGETS))
def test_exported_adapter_loads_in_peft_with_same_logits(case: str, tmp_path: Path) -> None:
    hf = hf_model(case)
    hf.save_pretrained(tmp_path / "base")
    engine, task = engine_with_task(tmp_path / "base", FAMILY_TARGETS[case])
    state = engine.tasks[task]
    save_adapter(
        tmp_path / "adapter",
        state.config.peft,
        state.adapter_state(),
        base_model=str(tmp_path / "base"),
        backbone=engine.model.config,
    )
    assert_peft_export_matches(engine.model, task, hf, tmp_path / "adapter")


@pytest.mark.parametrize("case", ["llama_tied_gqa_bias", "gpt2", "opt_post_ln_proj"])
def test_fx_trace_with_lora_hosts(case: str, tmp_path: Path) -> None:
    hf_model(case).save_pretrained(tmp_path)
    engine, task = engine_with_task(tmp_path, FAMILY_TARGETS[case])
    traced = trace_backbone(engine.model)
    adapted = [
        n.target
        for n in traced.graph.nodes
        if n.op == "call_module"
        and isinstance(host := traced.get_submodule(n.target), PeftHost)
        and task in host.adapters
    ]
    assert sorted(adapted) == sorted(engine.tasks[task].modules) and adapted
    # The adapter covers the middle sequence only; the others pass through the frozen backbone.
    input_ids, position_ids, layout = packed_inputs((None, task, None))
    _, _, plain = packed_inputs()
    with torch.no_grad():
        ours = engine.model(input_ids, position_ids, layout)
        torch.testing.assert_close(traced(input_ids, position_ids, layout), ours, atol=0, rtol=0)
        base = traced(input_ids, position_ids, plain)
    bounds = layout.cu_seqlens_S1.tolist()
    assert torch.equal(ours[: bounds[1]], base[: bounds[1]]) and torch.equal(ours[bounds[2] :], base[bounds[2] :])
    assert not torch.allclose(ours[bounds[1] : bounds[2]], base[bounds[1] : bounds[2]])


def test_adapter_round_trip_and_peft_key_names(tmp_path: Path) -> None:
    hf_model("llama_tied_gqa_bias").save_pretrained(tmp_path / "base")
    engine, task = engine_with_task(tmp_path / "base", ("q_proj", "v_proj"), rank=3)
    state = engine.tasks[task]
    params = dict(engine.model.named_parameters())
    assert "model.layers.0.self_attn.q_proj.weight" in params
    assert "model.layers.0.self_attn.q_proj.adapters.task.lora_A.weight" in params
    save_adapter(
        tmp_path / "a", state.config.peft, state.adapter_state(), base_model="base", backbone=engine.model.config
    )
    config, tensors = load_adapter(tmp_path / "a")
    assert config == state.config.peft
    assert tensors.keys() == state.adapter_state().keys()
    for key, value in state.adapter_state().items():
        assert torch.equal(tensors[key], value)
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["r"] == 3 and raw["lora_alpha"] == 6.0
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys


def test_adapter_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="adapter_config.json: adapter file not found"):
        load_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="adapter_config.json: invalid JSON"):
        load_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    )
    with pytest.raises(AdapterError, match="adapter_model.safetensors: not a readable safetensors file"):
        load_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(AdapterError, match="peft_type 'LOHA' is not supported"):
        load_adapter(tmp_path)
