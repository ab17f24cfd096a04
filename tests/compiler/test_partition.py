"""Trace and partition passes: partitioned graphs compute exactly what the model computes, and a
partition description is rebuilt on real models and refused when it does not match them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from muxtune.compiler.passes import partition, policy_from_name, trace_model
from muxtune.runtime.execution import (
    PartitionDescription,
    PartitionMismatchError,
    PartitionPolicy,
    carries_peft,
    collective,
    describe,
    fine,
    per_layers,
    rebuild_partition,
    split_graph,
)
from muxtune.runtime.layout import MicroBatchLayout
from muxtune.runtime.models import BackboneConfig, build_model, load_backbone
from muxtune.runtime.peft import attach_task
from muxtune.runtime.tracing import trace_backbone
from muxtune.specs import LoraSpec

VOCAB = 96
SEQ_LENS = (5, 11, 3, 7)
OWNERS = ("a", "a", "b", "b")

CONFIGS = {
    "llama": BackboneConfig(
        family="llama",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=64,
        rope_theta=10000.0,
        attention_bias=True,
        tie_word_embeddings=True,
    ),
    "gpt2": BackboneConfig(
        family="gpt2",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        max_position_embeddings=64,
        activation="gelu_new",
        tie_word_embeddings=True,
    ),
    "opt": BackboneConfig(
        family="opt",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        max_position_embeddings=64,
        activation="relu",
        do_layer_norm_before=False,
        word_embed_proj_dim=16,
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
    ),
}
TARGETS = {
    "llama": (("q_proj", "v_proj"), ("v_proj", "o_proj", "down_proj")),
    "gpt2": (("c_attn",), ("c_attn", "c_fc")),
    "opt": (("q_proj", "v_proj"), ("out_proj", "fc1")),
}
POLICIES: dict[str, PartitionPolicy] = {"fine": fine, "per_layers(1)": per_layers(1)}


def lora_tasks(targets: tuple[tuple[str, ...], tuple[str, ...]]) -> dict[str, LoraSpec]:
    """Two LoRA tasks of different ranks."""
    return {
        "a": LoraSpec("lora", r=4, alpha=8.0, dropout=0.0, target_modules=targets[0]),
        "b": LoraSpec("lora", r=2, alpha=2.0, dropout=0.0, target_modules=targets[1]),
    }


def with_tasks(model: nn.Module, tasks: dict[str, LoraSpec]) -> list[nn.Parameter]:
    """Attach `tasks` with random (non-zero) LoRA A and B; returns the LoRA parameters."""
    params: list[nn.Parameter] = []
    generator = torch.Generator().manual_seed(7)
    for seed, (name, config) in enumerate(tasks.items()):
        modules = attach_task(model, name, config, seed=seed, dropout_generator=torch.Generator())
        for module in modules.values():
            for param in module.parameters():
                with torch.no_grad():
                    param.copy_(0.2 * torch.randn(param.shape, generator=generator))
                params.append(param)
    return params


def micro_batch() -> tuple[torch.Tensor, torch.Tensor, MicroBatchLayout]:
    """Both tasks' sequences packed in one buffer."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (sum(SEQ_LENS),), generator=generator)
    position_ids = torch.cat([torch.arange(n) for n in SEQ_LENS])
    return input_ids, position_ids, MicroBatchLayout.for_sequences(SEQ_LENS, OWNERS)


def logits_and_grads(
    forward: Callable[..., torch.Tensor], params: list[nn.Parameter]
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    inputs = micro_batch()
    logits = forward(*inputs)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    return logits.detach(), torch.autograd.grad((logits * weights).sum(), params)


def assert_round_trip(model: nn.Module, params: list[nn.Parameter], description: PartitionDescription) -> None:
    """The model rebuilt from `description` gives bitwise the same logits and LoRA gradients."""
    partitioned = rebuild_partition(model, description)
    assert partitioned.description == description
    expected_logits, expected_grads = logits_and_grads(model, params)
    logits, grads = logits_and_grads(partitioned, params)
    assert torch.equal(logits, expected_logits)
    assert all(g.abs().sum() > 0 for g in expected_grads), "every LoRA parameter must get a gradient"
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert torch.equal(grad, expected)


@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("family", list(CONFIGS))
def test_partition_round_trip(family: str, policy_name: str) -> None:
    config, tasks, policy = CONFIGS[family], lora_tasks(TARGETS[family]), POLICIES[policy_name]
    description = partition(trace_model(config, tasks), policy)
    torch.manual_seed(0)
    model = build_model(config)
    params = with_tasks(model, tasks)
    assert describe(trace_backbone(model), policy) == description, "meta and CPU traces must agree"
    assert_round_trip(model, params, description)


@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_tiny_llama_round_trip(tiny_llama_dir: Path, policy_name: str) -> None:
    model, config = load_backbone(tiny_llama_dir, torch.float32)
    tasks = lora_tasks((("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj", "o_proj")))
    description = partition(trace_model(config, tasks), POLICIES[policy_name])
    params = with_tasks(model, tasks)
    assert_round_trip(model, params, description)


def test_subgraph_kinds_and_layers() -> None:
    config = CONFIGS["llama"]
    traced = trace_model(config, lora_tasks(TARGETS["llama"]))
    hosts = [
        n.name for n in traced.graph.nodes if n.op == "call_module" and carries_peft(traced.get_submodule(n.target))
    ]
    for policy in POLICIES.values():
        description = partition(traced, policy)
        assert sum(sub.num_nodes for sub in description.subgraphs) == sum(
            1 for n in traced.graph.nodes if n.op not in ("placeholder", "get_attr", "output")
        )
        for sub in description.subgraphs:
            assert sub.kind in ("backbone", "peft", "collective")
            assert -1 <= sub.layers[0] <= sub.layers[1] <= config.num_layers
            if sub.layers[0] != sub.layers[1]:
                assert policy is not fine
    fine_description = partition(traced, fine)
    peft = [sub for sub in fine_description.subgraphs if sub.kind == "peft"]
    assert [sub.first_node for sub in peft] == hosts, "each PEFT host call is its own subgraph here"
    assert all(sub.num_nodes == 1 and sub.layers[0] == sub.layers[1] for sub in peft)
    assert "layout" in peft[0].inputs and peft[0].outputs == (peft[0].first_node,)

    blocks = partition(traced, per_layers(1))
    assert [sub.layers for sub in blocks.subgraphs] == [(-1, -1), (0, 0), (1, 1), (2, 2)]
    assert {sub.kind for sub in blocks.subgraphs} == {"backbone"}
    assert [sub.layers for sub in partition(traced, per_layers(2)).subgraphs] == [(-1, -1), (0, 1), (2, 2)]
    layer_0, layer_1 = blocks.subgraphs[1:3]
    assert layer_0.outputs == (layer_0.last_node,) and layer_1.inputs[0] == layer_0.last_node


def test_description_is_deterministic_plain_data() -> None:
    config, tasks = CONFIGS["gpt2"], lora_tasks(TARGETS["gpt2"])
    first = partition(trace_model(config, tasks), per_layers(1))
    second = partition(trace_model(config, tasks), per_layers(1))
    assert first == second
    text = yaml.safe_dump(first.to_dict(), sort_keys=False)
    assert text == yaml.safe_dump(second.to_dict(), sort_keys=False)
    assert PartitionDescription.from_dict(yaml.safe_load(text)) == first
    assert policy_from_name(first.policy).__name__ == "per_layers(1)"
    assert policy_from_name("fine") is fine
    with pytest.raises(ValueError, match="unknown partition policy"):
        policy_from_name("coarse")
    with pytest.raises(ValueError, match="positive"):
        per_layers(0)


def edit(description: PartitionDescription, index: int, **changes: object) -> PartitionDescription:
    subgraphs = list(description.subgraphs)
    subgraphs[index] = dataclasses.replace(subgraphs[index], **changes)
    return dataclasses.replace(description, subgraphs=tuple(subgraphs))


@pytest.fixture(scope="module")
def llama_with_tasks() -> tuple[nn.Module, PartitionDescription]:
    tasks = lora_tasks(TARGETS["llama"])
    model = build_model(CONFIGS["llama"])
    with_tasks(model, tasks)
    return model, partition(trace_model(CONFIGS["llama"], tasks), fine)


@pytest.mark.parametrize(
    ("index", "changes", "message"),
    [
        (2, {"first_node": "renamed"}, "subgraph 2 (peft, layers 0..0): first_node is 'renamed' in the plan, "),
        (1, {"last_node": "renamed"}, "subgraph 1 (backbone, layers 0..0): last_node is 'renamed' in the plan"),
        (3, {"num_nodes": 4}, "subgraph 3 (backbone, layers 0..0): num_nodes is 4 in the plan, 3 in the model"),
        (1, {"digest": "sha256:0"}, "subgraph 1 (backbone, layers 0..0): digest is 'sha256:0' in the plan"),
        (1, {"inputs": ("position_ids_t",)}, "subgraph 1 (backbone, layers 0..0): inputs is ('position_ids_t',)"),
        (1, {"layers": (0, 1)}, "subgraph 1 (backbone, layers 0..1): layers is (0, 1) in the plan, (0, 0) in"),
        (1, {"kind": "peft"}, "subgraph 1 (peft, layers 0..0): a peft subgraph holds PEFT host calls only"),
        (2, {"kind": "collective"}, "a collective must be a subgraph of its own"),
        (2, {"kind": "fused"}, "kind 'fused' is not one of"),
    ],
)
def test_edited_description_is_refused(
    llama_with_tasks: tuple[nn.Module, PartitionDescription], index: int, changes: dict, message: str
) -> None:
    model, description = llama_with_tasks
    with pytest.raises(PartitionMismatchError) as info:
        rebuild_partition(model, edit(description, index, **changes))
    assert message in str(info.value)
    assert "the model's graph does not match" in str(info.value) or "kind" in message


def test_description_of_another_model_is_refused(llama_with_tasks: tuple[nn.Module, PartitionDescription]) -> None:
    model, description = llama_with_tasks
    tasks = lora_tasks(TARGETS["llama"])
    deeper = build_model(dataclasses.replace(CONFIGS["llama"], num_layers=3))
    with_tasks(deeper, tasks)
    with pytest.raises(PartitionMismatchError, match="num_layers is 2 in the plan, 3 in the model"):
        rebuild_partition(deeper, description)
    truncated = dataclasses.replace(description, subgraphs=description.subgraphs[:-1])
    with pytest.raises(PartitionMismatchError, match="first node after the last subgraph is None in the plan"):
        rebuild_partition(model, truncated)
    other_targets = build_model(CONFIGS["llama"])
    with_tasks(other_targets, lora_tasks((("k_proj",), ("v_proj",))))
    with pytest.raises(PartitionMismatchError, match="subgraph 2"):
        rebuild_partition(other_targets, description)


@torch.fx.wrap
@collective
def fake_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Stands in for a tensor-parallel all-reduce (a single rank: the identity)."""
    return x.clone()


class ToyLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_all_reduce(torch.relu(self.lin(x))) + x


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ToyLayer() for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers:
            x = layer(x)
        return self.head(x), x


TOY_FINE = ["B0-0", "C0-0", "B0-0", "B1-1", "C1-1", "B1-1", "B2-2"]
TOY_PAIRS = ["B0-0", "C0-0", "B0-1", "C1-1", "B1-1", "B2-2"]


@pytest.mark.parametrize(
    ("policy", "expected"), [(fine, TOY_FINE), (per_layers(1), TOY_FINE), (per_layers(2), TOY_PAIRS)]
)
def test_collectives_are_subgraphs_of_their_own(policy: PartitionPolicy, expected: list[str]) -> None:
    torch.manual_seed(0)
    toy = Toy()
    partitioned = split_graph(torch.fx.symbolic_trace(toy), policy)
    kinds = [f"{sub.kind[0].upper()}{sub.layers[0]}-{sub.layers[1]}" for sub in partitioned.description.subgraphs]
    assert kinds == expected
    collectives = [sub for sub in partitioned.description.subgraphs if sub.kind == "collective"]
    assert len(collectives) == 2 and all(sub.num_nodes == 1 for sub in collectives)
    x = torch.randn(5, 8)
    expected = toy(x)
    out = partitioned(x)
    assert isinstance(out, tuple) and len(out) == 2
    assert all(torch.equal(a, b) for a, b in zip(out, expected))
