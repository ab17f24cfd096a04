"""Backbone families against transformers: packed logits, fx tracing (PEFT hosts as leaves), loading
and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from hf_cases import CASES, VOCAB, hf_model, packed_inputs, reference_logits
from safetensors.torch import load_file, save_file

from muxtune.runtime.models import (
    BackboneConfig,
    Conv1D,
    PackedAttention,
    build_model,
    load_backbone,
    packed_causal_attention,
)
from muxtune.runtime.peft import PeftHost
from muxtune.runtime.tracing import trace_backbone

Saved = tuple[str, Path, transformers.PreTrainedModel]


@pytest.fixture(scope="module", params=list(CASES))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    case = request.param
    hf = hf_model(case)
    path = tmp_path_factory.mktemp(case)
    hf.save_pretrained(path)
    return case, path, hf


def test_packed_logits_match_transformers(saved: Saved) -> None:
    case, path, hf = saved
    model, config = load_backbone(path, torch.float32)
    assert config.to_dict() == BackboneConfig.from_dict(config.to_dict()).to_dict()
    json.dumps(config.to_dict())
    assert set(model.state_dict()) == set(hf.state_dict())
    input_ids, position_ids, layout = packed_inputs()
    with torch.no_grad():
        ours = model(input_ids, position_ids, layout)
        hidden = model.hidden_states(input_ids, position_ids, layout)
    torch.testing.assert_close(ours, reference_logits(hf, input_ids, layout), atol=1e-4, rtol=0)
    assert hidden.shape == (layout.num_tokens, model.lm_head.in_features)
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.input_embeddings().weight


def test_fx_trace_matches_eager(saved: Saved) -> None:
    _, path, _ = saved
    model, _ = load_backbone(path, torch.float32)
    traced = trace_backbone(model)
    nodes = list(traced.graph.nodes)
    assert [n.target for n in nodes if n.op == "placeholder"] == ["input_ids_T", "position_ids_T", "layout"]
    attn_calls = [
        n for n in nodes if n.op == "call_module" and isinstance(model.get_submodule(n.target), PackedAttention)
    ]
    assert len(attn_calls) == model.config.num_layers
    modules = {n.target for n in nodes if n.op == "call_module"}
    hosts = {name for name, module in model.named_modules() if isinstance(module, PeftHost)}
    assert "lm_head" in hosts and hosts <= modules
    input_ids, position_ids, layout = packed_inputs()
    with torch.no_grad():
        expected = model(input_ids, position_ids, layout)
        torch.testing.assert_close(traced(input_ids, position_ids, layout), expected, atol=0, rtol=0)


def test_module_names_follow_hf() -> None:
    hf = hf_model("llama")
    config = BackboneConfig.from_hf_dict(hf.config.to_dict())
    ours = build_model(config, device="meta")
    assert [n for n, _ in ours.named_modules() if n.endswith("_proj")] == [
        n for n, _ in hf.named_modules() if n.endswith("_proj")
    ]
    gpt2 = build_model(BackboneConfig.from_hf_dict(hf_model("gpt2").config.to_dict()), device="meta")
    c_attn = gpt2.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Conv1D) and (c_attn.in_features, c_attn.out_features) == (32, 96)
    assert c_attn.weight.shape == (32, 96) and c_attn.weight.is_meta
    built = build_model(config, dtype=torch.bfloat16)
    assert {p.dtype for p in built.parameters()} == {torch.bfloat16}
    assert built.model.rotary_emb.inv_freq.dtype == torch.float32
    input_ids, position_ids, layout = packed_inputs()
    assert built(input_ids, position_ids, layout).shape == (layout.num_tokens, VOCAB)


def test_sharded_and_bf16(tmp_path: Path) -> None:
    hf = hf_model("llama_tied_gqa_bias")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model, _ = load_backbone(tmp_path, torch.float32)
    input_ids, position_ids, layout = packed_inputs()
    ref = reference_logits(hf, input_ids, layout)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids, position_ids, layout), ref, atol=1e-4, rtol=0)
    model_bf16, _ = load_backbone(tmp_path, torch.bfloat16)
    assert {p.dtype for p in model_bf16.parameters()} == {torch.bfloat16}
    assert model_bf16.model.rotary_emb.inv_freq.dtype == torch.float32
    with torch.no_grad():
        logits = model_bf16(input_ids, position_ids, layout)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - ref).abs().max() < 0.25


def test_gpt2_original_layout(tmp_path: Path) -> None:
    """Keys without `transformer.`, with attn.bias buffers, and a redundant lm_head."""
    hf = hf_model("gpt2")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    legacy = {k.removeprefix("transformer."): v for k, v in state.items()}
    legacy["h.0.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    legacy["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    legacy["lm_head.weight"] = state["transformer.wte.weight"].clone()
    save_file(legacy, tmp_path / "model.safetensors")
    model, _ = load_backbone(tmp_path, torch.float32)
    input_ids, position_ids, layout = packed_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids, position_ids, layout), reference_logits(hf, input_ids, layout), atol=1e-4, rtol=0
        )


def test_opt_without_model_prefix(tmp_path: Path) -> None:
    hf = hf_model("opt_pre_ln")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in state.items()}, tmp_path / "model.safetensors")
    model, _ = load_backbone(tmp_path, torch.float32)
    assert torch.equal(model.model.decoder.embed_positions.weight, hf.model.decoder.embed_positions.weight)


def test_missing_weights_file(tmp_path: Path) -> None:
    hf_model("gpt2").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_backbone(tmp_path, torch.float32)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone(tmp_path, torch.float32)


def test_missing_and_mismatched_tensor(tmp_path: Path) -> None:
    hf_model("qwen2_untied_gqa").save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    state = load_file(file)
    del state["model.layers.1.self_attn.k_proj.bias"]
    state["model.norm.weight"] = torch.ones(7)
    state["model.extra.weight"] = torch.ones(2)
    save_file(state, file)
    with pytest.raises(ValueError) as err:
        load_backbone(tmp_path, torch.float32)
    message = str(err.value)
    assert "model.layers.1.self_attn.k_proj.bias" in message
    assert "model.norm.weight" in message and "model.extra.weight" in message


def test_from_hf_dict_errors() -> None:
    with pytest.raises(ValueError, match="model_type"):
        BackboneConfig.from_hf_dict({"model_type": "bert"})
    good = hf_model("llama").config.to_dict()
    for field in ("hidden_size", "vocab_size", "num_hidden_layers"):
        bad = {k: v for k, v in good.items() if k != field}
        with pytest.raises(ValueError, match=field):
            BackboneConfig.from_hf_dict(bad)
    with pytest.raises(ValueError, match="rope_type"):
        BackboneConfig.from_hf_dict({**good, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})


def test_legacy_rope_scaling_layout() -> None:
    legacy = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 24,
        "max_position_embeddings": 128,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    }
    config = BackboneConfig.from_hf_dict(legacy)
    assert config.rope_theta == 500000.0 and config.rope_type == "llama3"
    assert config.rope_scaling["original_max_position_embeddings"] == 128


def test_attention_never_crosses_sequences() -> None:
    torch.manual_seed(0)
    q = torch.randn(10, 4, 8, requires_grad=True)
    k, v = torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 4, 10])
    out = packed_causal_attention(q, k, v, cu)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    k2, v2 = k.clone(), v.clone()
    k2[4:] += 1.0
    v2[4:] += 1.0
    torch.testing.assert_close(packed_causal_attention(q, k2, v2, cu)[:4], out[:4], atol=0, rtol=0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_causal_attention(q, k, v, torch.tensor([0, 4, 9]))
