"""DoRA and (IA)^3 against peft: fused training equals training alone and equals transformers +
peft, exported adapters load in peft with our logits, the DoRA layer equals peft's with and
without dropout, and the adapter files round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_cases import assert_peft_export_matches, hf_model
from safetensors.torch import load_file
from training_cases import TaskCase, make_batches, relative_update_difference, train_muxtune, train_transformers_peft
from transformers.pytorch_utils import Conv1D

from muxtune.runtime.adapters import AdapterError, load_adapter, save_adapter
from muxtune.runtime.backbone import load_model
from muxtune.runtime.engine import MultiTaskEngine, TaskTraining
from muxtune.runtime.models import build_model, load_backbone
from muxtune.runtime.peft import PeftAttachError, attach_task
from muxtune.runtime.peft.dora import DoraModule, host_fan_in_fan_out
from muxtune.runtime.peft.ia3 import IA3Module
from muxtune.runtime.peft.lora import LoraConfig
from muxtune.specs import IA3Spec, LoraSpec

DORA = LoraSpec("lora", 4, 8.0, 0.0, ("down_proj", "q_proj", "v_proj"), use_dora=True)
IA3 = IA3Spec(target_modules=("down_proj", "k_proj", "up_proj", "v_proj"), feedforward_modules=("down_proj",))

TASKS = (
    TaskCase(
        TaskTraining("dora", DORA, lr=3e-3, steps=10, schedule="linear", warmup_steps=2, weight_decay=0.01, seed=1),
        batch_size=3,
        min_len=6,
        max_len=20,
    ),
    TaskCase(
        TaskTraining("ia3", IA3, lr=1e-2, steps=10, schedule="cosine", warmup_steps=1, max_grad_norm=0.5, seed=2),
        batch_size=2,
        min_len=10,
        max_len=30,
    ),
    TaskCase(
        TaskTraining("lora", LoraSpec("lora", 2, 4.0, 0.0, ("q_proj", "o_proj")), lr=5e-3, steps=10, seed=3),
        batch_size=4,
        min_len=4,
        max_len=12,
    ),
)
COMPARED = ("dora", "ia3")


def perturb(modules: dict[str, torch.nn.Module], generator: torch.Generator, scale: float) -> None:
    """A non-degenerate start: non-zero B, magnitudes and (IA)^3 vectors away from their init."""
    with torch.no_grad():
        for module in modules.values():
            if isinstance(module, IA3Module):
                module.ia3_l.add_(scale * torch.randn(module.ia3_l.shape, generator=generator))
                continue
            module.lora_B.weight.copy_(scale * torch.randn(module.lora_B.weight.shape, generator=generator))
            if isinstance(module, DoraModule):
                magnitude = module.lora_magnitude_vector.weight
                magnitude.mul_(1 + scale * torch.randn(magnitude.shape, generator=generator))


def peft_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's trainable names as our state keys: peft's `ia3_l` is a ParameterDict, so its
    names end with the adapter name (`....ia3_l.default`)."""
    return {key.removesuffix(".default"): value for key, value in state.items()}


@pytest.fixture(scope="module")
def init_adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Perturbed initial adapters, one peft directory per task."""
    loaded = load_model(str(tiny_llama_dir))
    engine = MultiTaskEngine(loaded.model)
    root = tmp_path_factory.mktemp("dora-ia3-init")
    generator = torch.Generator().manual_seed(11)
    paths = {}
    for case in TASKS:
        state = engine.add_task(case.training)
        perturb(state.modules, generator, 0.05)
        paths[case.training.name] = save_adapter(
            root / case.training.name,
            case.training.peft,
            state.adapter_state(),
            base_model=str(tiny_llama_dir),
            backbone=loaded.config,
        )
    return paths


@pytest.fixture(scope="module")
def runs(tiny_llama_dir: Path, init_adapters: dict[str, Path]) -> dict:
    init = {name: load_adapter(path)[1] for name, path in init_adapters.items()}
    vocab = load_model(str(tiny_llama_dir)).config.vocab_size
    batches = {c.training.name: make_batches(c, vocab, data_seed=0) for c in TASKS}
    fused = train_muxtune(tiny_llama_dir, TASKS, init, batches, max_tokens=40)
    alone = {
        c.training.name: train_muxtune(tiny_llama_dir, (c,), init, batches, 10**6)[c.training.name]
        for c in TASKS
        if c.training.name in COMPARED
    }
    return {"init": init, "batches": batches, "fused": fused, "alone": alone}


@pytest.mark.parametrize("name", COMPARED)
def test_fused_equals_alone(name: str, runs: dict) -> None:
    init = runs["init"][name]
    update = sum(float((runs["alone"][name][k] - init[k]).norm()) for k in init)
    assert update > 1e-3, "training did not move the adapter; the comparison would be vacuous"
    assert relative_update_difference(runs["fused"][name], runs["alone"][name], init) <= 1e-4


@pytest.mark.parametrize("name", COMPARED)
def test_alone_equals_transformers_peft(name: str, runs: dict, tiny_llama_dir: Path, init_adapters: dict) -> None:
    case = next(c for c in TASKS if c.training.name == name)
    init = runs["init"][name]
    reference = peft_keys(train_transformers_peft(tiny_llama_dir, case, init_adapters[name], runs["batches"][name]))
    assert set(reference) == set(init)
    assert relative_update_difference(runs["alone"][name], reference, init) <= 1e-3


FAMILY_SPECS = {
    "llama_tied_gqa_bias": (
        LoraSpec("lora", 4, 8.0, 0.0, ("down_proj", "q_proj", "v_proj"), use_dora=True),
        IA3Spec(target_modules=("down_proj", "k_proj", "v_proj"), feedforward_modules=("down_proj",)),
    ),
    "gpt2": (
        LoraSpec("lora", 4, 8.0, 0.0, ("c_attn", "c_fc", "c_proj"), use_dora=True),
        IA3Spec(target_modules=("c_attn", "mlp.c_proj"), feedforward_modules=("mlp.c_proj",)),
    ),
    "opt_post_ln_proj": (
        LoraSpec("lora", 4, 8.0, 0.0, ("fc1", "out_proj", "q_proj"), use_dora=True),
        IA3Spec(target_modules=("fc2", "k_proj", "v_proj"), feedforward_modules=("fc2",)),
    ),
}


@pytest.mark.parametrize("method", ["dora", "ia3"])
@pytest.mark.parametrize("case", list(FAMILY_SPECS))
def test_exported_adapter_loads_in_peft_with_same_logits(case: str, method: str, tmp_path: Path) -> None:
    hf = hf_model(case)
    hf.save_pretrained(tmp_path / "base")
    model, _ = load_backbone(tmp_path / "base", torch.float32)
    engine = MultiTaskEngine(model)
    spec = FAMILY_SPECS[case][method == "ia3"]
    state = engine.add_task(TaskTraining("task", spec, lr=1e-3, steps=1))
    perturb(state.modules, torch.Generator().manual_seed(5), 0.2)
    base_model = str(tmp_path / "base")
    save_adapter(tmp_path / "adapter", spec, state.adapter_state(), base_model=base_model, backbone=model.config)
    assert_peft_export_matches(engine.model, "task", hf, tmp_path / "adapter")


class FixedMask(torch.nn.Module):
    """A dropout stand-in (not nn.Identity, so peft takes its dropout path) with a fixed mask."""

    def __init__(self, mask: torch.Tensor, p: float) -> None:
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask / (1.0 - self.p)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_dora_layer_equals_peft(conv1d: bool, dropout: float) -> None:
    """Output and gradients of one DoRA layer with a biased base, peft's dropout path included
    (its base output is then recomputed from the dropped input, without the bias)."""
    import peft

    torch.manual_seed(0)
    in_f, out_f, rank, tokens = 12, 10, 3, 7
    base = Conv1D(out_f, in_f) if conv1d else torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        base.weight.normal_()
        base.bias.normal_()
    config = peft.LoraConfig(r=rank, lora_alpha=6, lora_dropout=dropout, use_dora=True, fan_in_fan_out=conv1d)
    theirs = peft.tuners.lora.Linear(base, "default", r=rank, lora_alpha=6, lora_dropout=dropout, config=config)
    weight_oi = base.weight.t() if conv1d else base.weight
    ours = DoraModule(
        in_f, out_f, LoraConfig(rank, 6.0, dropout), torch.linalg.norm(weight_oi, dim=1), fan_in_fan_out=conv1d
    )
    torch.testing.assert_close(ours.lora_magnitude_vector.weight, theirs.lora_magnitude_vector["default"].weight)
    with torch.no_grad():
        theirs.lora_A["default"].weight.normal_()
        theirs.lora_B["default"].weight.normal_()
        theirs.lora_magnitude_vector["default"].weight.mul_(1.5)
        ours.lora_A.weight.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.weight.copy_(theirs.lora_B["default"].weight)
        ours.lora_magnitude_vector.weight.copy_(theirs.lora_magnitude_vector["default"].weight)
    mask = (torch.rand(tokens, in_f) > dropout).float()
    if dropout:
        theirs.lora_dropout["default"] = FixedMask(mask, dropout)
        ours.dropout = FixedMask(mask, dropout).forward  # replaces the method: same mask in both
    x = torch.randn(tokens, in_f)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_theirs = theirs.train()(x_theirs)
    y_ours = ours.train().adapt(x_ours, base(x_ours), base)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, atol=1e-5, rtol=1e-5)
    for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
        grads = getattr(ours, name).weight.grad, getattr(theirs, name)["default"].weight.grad
        torch.testing.assert_close(*grads, atol=1e-4, rtol=1e-4)


def test_dora_and_ia3_attach_on_a_meta_backbone(tiny_llama_dir: Path) -> None:
    """The compiler's checks attach to a backbone without weights: shapes only."""
    config = load_model(str(tiny_llama_dir)).config
    model = build_model(config, device="meta")
    generator = torch.Generator()
    dora = attach_task(model, "d", DORA, seed=0, dropout_generator=generator)
    ia3 = attach_task(model, "i", IA3, seed=0, dropout_generator=generator)
    magnitude = dora["model.layers.0.mlp.down_proj"].lora_magnitude_vector.weight
    assert magnitude.shape == (config.hidden_size,) and magnitude.device.type == "cpu"
    assert ia3["model.layers.0.mlp.down_proj"].ia3_l.shape == (1, config.intermediate_size)
    assert ia3["model.layers.0.self_attn.k_proj"].ia3_l.shape == (config.num_kv_heads * config.head_dim, 1)


def test_dora_rejects_a_host_that_is_not_linear() -> None:
    class OddHost(torch.nn.Module):
        in_features, out_features = 3, 3
        weight = torch.zeros(3, 3, 3)

    with pytest.raises(PeftAttachError, match="DoRA supports linear operators only") as info:
        host_fan_in_fan_out(OddHost())
    assert info.value.field == "use_dora"


@pytest.mark.parametrize("spec", [DORA, IA3], ids=["dora", "ia3"])
def test_round_trip_and_peft_key_names(spec: LoraSpec | IA3Spec, tiny_llama_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_llama_dir))
    engine = MultiTaskEngine(loaded.model)
    task = engine.add_task(TaskTraining("task", spec, lr=1e-3, steps=1))
    perturb(task.modules, torch.Generator().manual_seed(3), 0.1)
    state = task.adapter_state()
    save_adapter(tmp_path / "a", spec, state, base_model="base", backbone=loaded.config)
    loaded_spec, loaded_state = load_adapter(tmp_path / "a")
    assert loaded_spec == spec
    assert loaded_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded_state[key], value)
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    prefix = "base_model.model.model.layers.0."
    if spec is DORA:
        assert raw["peft_type"] == "LORA" and raw["use_dora"] is True
        assert f"{prefix}self_attn.q_proj.lora_magnitude_vector" in keys
        assert "model.layers.0.self_attn.q_proj.lora_magnitude_vector.weight" in state
    else:
        assert raw["peft_type"] == "IA3" and raw["task_type"] == "CAUSAL_LM"
        assert raw["feedforward_modules"] == ["down_proj"] and raw["fan_in_fan_out"] is False
        assert {f"{prefix}mlp.down_proj.ia3_l", f"{prefix}self_attn.k_proj.ia3_l"} <= keys


def test_ia3_load_errors_name_the_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    save_adapter(
        tmp_path,
        IA3Spec(target_modules=("k_proj",), feedforward_modules=()),
        {"model.layers.0.self_attn.k_proj.ia3_l": torch.ones(4, 1)},
        base_model="base",
        backbone=load_model(str(tiny_llama_dir)).config,
    )
    path = tmp_path / "adapter_config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "target_modules": "k_proj"}))
    with pytest.raises(AdapterError, match=r"adapter_config.json: target_modules must be a non-empty list"):
        load_adapter(tmp_path)
    path.write_text(json.dumps({**raw, "feedforward_modules": ["down_proj"]}))
    with pytest.raises(AdapterError, match=r"adapter_config.json: feedforward_modules must be a subset"):
        load_adapter(tmp_path)
    path.write_text(json.dumps(raw))
    assert load_adapter(tmp_path)[0] == IA3Spec(target_modules=("k_proj",), feedforward_modules=())
