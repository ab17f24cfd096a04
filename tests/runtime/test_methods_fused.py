"""Every PEFT method at once: seven tasks of seven methods fused in one hTask each equal the task
trained alone (DESIGN section 4), and one task's data never changes another's result, across
methods (bitwise, with one intra-op thread)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_cases import TaskCase, make_batches, relative_update_difference, train_muxtune

from muxtune.runtime.backbone import load_model
from muxtune.runtime.engine import MultiTaskEngine, TaskTraining
from muxtune.specs import AdapterSpec, BiasSpec, IA3Spec, LoraSpec, PrefixTuningSpec, PromptTuningSpec

SPECS = {
    "lora": LoraSpec(r=4, alpha=8.0, target_modules=("q_proj", "v_proj")),
    "dora": LoraSpec(r=2, alpha=4.0, target_modules=("k_proj", "down_proj"), use_dora=True),
    "ia3": IA3Spec(target_modules=("k_proj", "v_proj", "down_proj")),
    "prefix": PrefixTuningSpec(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16),
    "prompt": PromptTuningSpec(num_virtual_tokens=4),
    "adapter": AdapterSpec(variant="houlsby", bottleneck_size=8, non_linearity="gelu"),
    "bias": BiasSpec(target_modules=("o_proj", "up_proj")),
}
CASES = tuple(
    TaskCase(
        TaskTraining(name, spec, lr=3e-3, steps=10 + i % 3, weight_decay=0.01 * (i % 2), seed=i + 1),
        batch_size=2 + i % 2,
        min_len=6 + 2 * i,
        max_len=18 + 4 * i,
    )
    for i, (name, spec) in enumerate(SPECS.items())
)


def perturbed_states(model_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each task's seeded initialization moved off its degenerate start (zero B, unit scales,
    zero biases), so every parameter has a gradient from the first step."""
    engine = MultiTaskEngine(load_model(str(model_dir)).model)
    generator = torch.Generator().manual_seed(1234)
    states = {}
    for case in CASES:
        state = engine.add_task(case.training).adapter_state()
        states[case.training.name] = {
            key: value + 0.05 * torch.randn(value.shape, generator=generator) for key, value in state.items()
        }
    return states


@pytest.fixture(scope="module")
def runs(tiny_llama_dir: Path) -> dict:
    vocab = load_model(str(tiny_llama_dir)).config.vocab_size
    init = perturbed_states(tiny_llama_dir)
    batches = {c.training.name: make_batches(c, vocab, data_seed=0) for c in CASES}
    fused = train_muxtune(tiny_llama_dir, CASES, init, batches, max_tokens=48)
    alone = {c.training.name: train_muxtune(tiny_llama_dir, (c,), init, batches, 10**6)[c.training.name] for c in CASES}
    return {"init": init, "batches": batches, "fused": fused, "alone": alone, "vocab": vocab}


@pytest.mark.parametrize("name", list(SPECS))
def test_fused_with_every_other_method_equals_alone(name: str, runs: dict) -> None:
    init = runs["init"][name]
    update = sum(float((runs["alone"][name][k] - init[k]).norm()) for k in init)
    assert update > 1e-3, "training did not move the adapter; the comparison would be vacuous"
    assert relative_update_difference(runs["fused"][name], runs["alone"][name], init) <= 1e-4


def test_changing_the_prefix_task_data_leaves_the_others_bitwise_identical(runs: dict, tiny_llama_dir: Path) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = train_muxtune(tiny_llama_dir, CASES, runs["init"], runs["batches"], max_tokens=48)
        prefix_case = next(c for c in CASES if c.training.name == "prefix")
        changed = {**runs["batches"], "prefix": make_batches(prefix_case, runs["vocab"], data_seed=9)}
        other = train_muxtune(tiny_llama_dir, CASES, runs["init"], changed, max_tokens=48)
    finally:
        torch.set_num_threads(previous)
    for name in SPECS:
        if name == "prefix":
            assert any(not torch.equal(other[name][k], v) for k, v in reference[name].items())
            continue
        for key, value in reference[name].items():
            assert torch.equal(other[name][key], value), f"{name}.{key} changed with the prefix task's data"
