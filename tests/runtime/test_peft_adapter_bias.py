"""Bottleneck adapters (Houlsby, Pfeiffer) and bias tuning: a task fused with others equals it
alone; alone equals an independent reference (the transformers model with forward hooks, not our
modules); our logits equal the hooked transformers model's on GPT-2 and OPT; adapter files round
trip, and bad ones are refused naming the file and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from hf_cases import hf_model, packed_inputs, reference_logits
from torch import nn
from training_cases import TaskCase, make_batches, relative_update_difference, train_muxtune, train_peft_model
from transformers.activations import ACT2FN

from muxtune.runtime.adapters import AdapterError, load_adapter, save_adapter
from muxtune.runtime.backbone import load_model
from muxtune.runtime.engine import MultiTaskEngine, TaskTraining
from muxtune.runtime.models import load_backbone
from muxtune.runtime.peft import PeftAttachError
from muxtune.specs import AdapterSpec, BiasSpec, LoraSpec

HOULSBY = TaskCase(
    TaskTraining(
        "houlsby",
        AdapterSpec("adapter", "houlsby", 8, "gelu_new"),
        lr=3e-3,
        steps=10,
        schedule="linear",
        warmup_steps=2,
        weight_decay=0.01,
        max_grad_norm=1.0,
        seed=1,
    ),
    batch_size=3,
    min_len=6,
    max_len=20,
)
PFEIFFER = TaskCase(
    TaskTraining(
        "pfeiffer",
        AdapterSpec("adapter", "pfeiffer", 4, "tanh"),
        lr=5e-3,
        steps=10,
        schedule="cosine",
        warmup_steps=0,
        max_grad_norm=0.5,
        seed=2,
    ),
    batch_size=2,
    min_len=12,
    max_len=30,
)
BIAS = TaskCase(
    TaskTraining(
        "bias",
        BiasSpec("bias", ("down_proj", "k_proj", "lm_head", "v_proj")),
        lr=4e-3,
        steps=11,
        schedule="constant",
        warmup_steps=1,
        weight_decay=0.1,
        max_grad_norm=2.0,
        seed=3,
    ),
    batch_size=4,
    min_len=4,
    max_len=12,
)
COMPANION = TaskCase(  # a LoRA task sharing the adapters' hosts (o_proj, down_proj)
    TaskTraining("lora", LoraSpec("lora", 4, 8.0, 0.0, ("q_proj", "o_proj", "down_proj")), lr=2e-3, steps=12, seed=4),
    batch_size=2,
    min_len=8,
    max_len=24,
)
CASES = (HOULSBY, PFEIFFER, BIAS)
ADAPTER_PARAMS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")


def perturb(modules: dict[str, nn.Module], seed: int) -> None:
    """A non-degenerate start: non-zero adapter biases and up weights, non-zero bias deltas."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules.values():
            for name, param in module.named_parameters():
                if name != "adapter_down.weight":
                    scale = 0.2 if name == "bias_delta" else 0.1
                    param.copy_(scale * torch.randn(param.shape, generator=generator))


class HookedMethod(nn.Module):
    """The reference: a task's parameters at one transformers module, applied by a forward hook
    that adds the adapter (`h + up(act(down(h)))`) or the bias delta to the module's output."""

    def __init__(self, state: dict[str, torch.Tensor], anchor: str, non_linearity: str | None) -> None:
        super().__init__()
        self.act = None if non_linearity is None else ACT2FN[non_linearity]
        names = ("bias_delta",) if non_linearity is None else ADAPTER_PARAMS
        self.names = {n.replace(".", "_"): n for n in names}  # ParameterDict keys cannot hold dots
        self.params = nn.ParameterDict(
            {key: nn.Parameter(state[f"{anchor}.{n}"].clone().float()) for key, n in self.names.items()}
        )

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.act is None:
            return output + p["bias_delta"]
        hidden = self.act(F.linear(output, p["adapter_down_weight"], p["adapter_down_bias"]))
        return output + F.linear(hidden, p["adapter_up_weight"], p["adapter_up_bias"])


def hook_method(model: nn.Module, spec: AdapterSpec | BiasSpec, state: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """Register `HookedMethod`s on the transformers modules named by `state`'s keys, as children
    of those modules (so the model's parameters include them); returns them by anchor."""
    suffix = ".bias_delta" if isinstance(spec, BiasSpec) else ".adapter_down.weight"
    anchors = sorted(key.removesuffix(suffix) for key in state if key.endswith(suffix))
    hooked = {}
    for anchor in anchors:
        target = model.get_submodule(anchor)
        hooked[anchor] = HookedMethod(state, anchor, getattr(spec, "non_linearity", None))
        target.add_module("reference_method", hooked[anchor])
        target.register_forward_hook(hooked[anchor].hook)
    return hooked


def hooked_state(hooked: dict[str, HookedMethod]) -> dict[str, torch.Tensor]:
    """The hooked parameters keyed like MuxTune's states."""
    return {
        f"{anchor}.{module.names[key]}": p.detach().clone()
        for anchor, module in hooked.items()
        for key, p in module.params.items()
    }


@pytest.fixture(scope="module")
def init_states(tiny_llama_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    engine = MultiTaskEngine(load_model(str(tiny_llama_dir)).model)
    states = {}
    for index, case in enumerate(CASES):
        state = engine.add_task(case.training)
        perturb(state.modules, seed=50 + index)
        states[case.training.name] = state.adapter_state()
    return states


@pytest.fixture(scope="module")
def runs(tiny_llama_dir: Path, init_states: dict) -> dict:
    vocab = load_model(str(tiny_llama_dir)).config.vocab_size
    cases = (*CASES, COMPANION)
    batches = {c.training.name: make_batches(c, vocab, data_seed=0) for c in cases}
    fused = train_muxtune(tiny_llama_dir, cases, init_states, batches, max_tokens=40)
    alone = {
        c.training.name: train_muxtune(tiny_llama_dir, (c,), init_states, batches, 10**6)[c.training.name]
        for c in CASES
    }
    return {"batches": batches, "fused": fused, "alone": alone}


def test_attach_points(init_states: dict) -> None:
    layers = range(2)
    assert sorted(k.removesuffix(".adapter_down.weight") for k in init_states["houlsby"] if "down.weight" in k) == [
        f"model.layers.{i}.{p}" for i in layers for p in ("mlp.down_proj", "self_attn.o_proj")
    ]
    assert [k for k in init_states["pfeiffer"] if "down.weight" in k] == [
        f"model.layers.{i}.mlp.down_proj.adapter_down.weight" for i in layers
    ]
    assert init_states["houlsby"]["model.layers.0.mlp.down_proj.adapter_down.weight"].shape == (8, 64)
    assert init_states["bias"]["lm_head.bias_delta"].shape == (512,)
    assert init_states["bias"]["model.layers.1.self_attn.k_proj.bias_delta"].shape == (32,)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.training.name)
def test_fused_with_lora_equals_alone(case: TaskCase, runs: dict, init_states: dict) -> None:
    name = case.training.name
    init = init_states[name]
    update = sum(float((runs["alone"][name][k] - init[k]).norm()) for k in init)
    assert update > 1e-3, "training did not move the task; the comparison would be vacuous"
    assert relative_update_difference(runs["fused"][name], runs["alone"][name], init) <= 1e-4


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.training.name)
def test_alone_equals_hooked_transformers(case: TaskCase, runs: dict, init_states: dict, tiny_llama_dir: Path) -> None:
    name = case.training.name
    init = init_states[name]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model.requires_grad_(False)
    hooked = hook_method(model, case.training.peft, init)
    train_peft_model(model, case.training, runs["batches"][name])
    reference = hooked_state(hooked)
    assert set(reference) == set(init)
    assert relative_update_difference(runs["alone"][name], reference, init) <= 1e-3


FAMILY_SPECS = {
    "gpt2-houlsby": ("gpt2", AdapterSpec("adapter", "houlsby", 6, "relu")),
    "opt-houlsby": ("opt_post_ln_proj", AdapterSpec("adapter", "houlsby", 5, "silu")),
    "opt-pfeiffer": ("opt_pre_ln", AdapterSpec("adapter", "pfeiffer", 3, "gelu")),
    "gpt2-bias": ("gpt2", BiasSpec("bias", ("c_attn", "mlp.c_proj"))),
}
FAMILY_ANCHORS = {
    "gpt2-houlsby": [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_proj", "mlp.c_proj")],
    "opt-houlsby": [f"model.decoder.layers.{i}.{p}" for i in range(2) for p in ("self_attn.out_proj", "fc2")],
    "opt-pfeiffer": [f"model.decoder.layers.{i}.fc2" for i in range(2)],
    "gpt2-bias": [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "mlp.c_proj")],
}


@pytest.mark.parametrize("key", list(FAMILY_SPECS))
def test_logits_equal_hooked_transformers(key: str, tmp_path: Path) -> None:
    case, spec = FAMILY_SPECS[key]
    hf = hf_model(case)
    hf.save_pretrained(tmp_path)
    model, _ = load_backbone(tmp_path, torch.float32)
    engine = MultiTaskEngine(model)
    state = engine.add_task(TaskTraining("task", spec, lr=1e-3, steps=1))
    assert list(state.modules) == FAMILY_ANCHORS[key]
    perturb(state.modules, seed=7)
    input_ids, position_ids, layout = packed_inputs(("task", "task", None))
    with torch.no_grad():
        ours = engine.model(input_ids, position_ids, layout)
        base = reference_logits(hf, input_ids, layout)
        hook_method(hf, spec, state.adapter_state())
        theirs = reference_logits(hf, input_ids, layout)
    end = layout.cu_seqlens_S1.tolist()[2]  # the task's two sequences; the third is of no task
    assert (theirs - base).abs().max() > 1e-2, "the method must change the logits"
    torch.testing.assert_close(ours[:end], theirs[:end], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[end:], base[end:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.training.name)
def test_adapter_files_round_trip(case: TaskCase, init_states: dict, tiny_llama_dir: Path, tmp_path: Path) -> None:
    name, spec = case.training.name, case.training.peft
    loaded = load_model(str(tiny_llama_dir))
    save_adapter(tmp_path, spec, init_states[name], base_model="builtin:tiny-llama", backbone=loaded.config)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == ("MUXTUNE_BIAS" if name == "bias" else "MUXTUNE_ADAPTER")
    assert raw["task_type"] == "CAUSAL_LM" and raw["base_model_name_or_path"] == "builtin:tiny-llama"
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == {
        "base_model.model." + k for k in init_states[name]
    }
    read_spec, state = load_adapter(tmp_path)
    assert read_spec == spec and state.keys() == init_states[name].keys()
    assert all(torch.equal(state[k], v) for k, v in init_states[name].items())
    engine = MultiTaskEngine(loaded.model)
    assert engine.add_task(case.training, init_state=state).adapter_state().keys() == state.keys()


def test_bad_adapter_files_name_file_and_field(init_states: dict, tiny_llama_dir: Path, tmp_path: Path) -> None:
    backbone = load_model(str(tiny_llama_dir)).config
    save_adapter(tmp_path / "a", HOULSBY.training.peft, init_states["houlsby"], base_model="m", backbone=backbone)
    config_path = tmp_path / "a" / "adapter_config.json"
    good = json.loads(config_path.read_text())
    for field, value, message in (
        ("variant", "serial", "variant must be one of"),
        ("bottleneck_size", 0, "bottleneck_size must be a positive integer"),
        ("non_linearity", "softmax", "non_linearity must be one of"),
    ):
        config_path.write_text(json.dumps({**good, field: value}))
        with pytest.raises(AdapterError, match=f"adapter_config.json: {message}"):
            load_adapter(tmp_path / "a")
    config_path.write_text(json.dumps({**good, "bottleneck_size": 4}))
    with pytest.raises(AdapterError, match="adapter_model.safetensors: tensor .* does not fit bottleneck_size 4"):
        load_adapter(tmp_path / "a")

    save_adapter(tmp_path / "b", BIAS.training.peft, init_states["bias"], base_model="m", backbone=backbone)
    config_path = tmp_path / "b" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "target_modules": []}))
    with pytest.raises(AdapterError, match="adapter_config.json: target_modules must be a non-empty list"):
        load_adapter(tmp_path / "b")


def test_bias_targets_that_match_nothing_name_the_field(tiny_llama_dir: Path) -> None:
    engine = MultiTaskEngine(load_model(str(tiny_llama_dir)).model)
    with pytest.raises(PeftAttachError, match="match no linear operator") as info:
        engine.add_task(TaskTraining("t", BiasSpec("bias", ("c_attn",)), lr=1e-3, steps=1))
    assert info.value.field == "target_modules"
