"""Prefix tuning (with and without peft's reparameterization MLP) and prompt tuning: fused equals
alone, alone equals transformers + peft trained on the same batches from the same initial values,
exported adapters load in peft with the same logits, a LoRA task sharing their micro-batches is
bitwise unaffected by their data, and prompt tuning's TEXT init equals peft's."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from types import SimpleNamespace

import peft
import pytest
import torch
import transformers
from hf_cases import VOCAB, hf_model
from training_cases import TaskCase, make_batches, relative_update_difference, train_muxtune, train_peft_model

from muxtune.runtime.adapters import AdapterError, load_adapter, save_adapter
from muxtune.runtime.backbone import load_model
from muxtune.runtime.data import Example
from muxtune.runtime.engine import MultiTaskEngine, TaskTraining, load_task_state
from muxtune.runtime.execution import carries_peft
from muxtune.runtime.models import BackboneConfig, build_model, load_backbone
from muxtune.runtime.packing import build_microbatch
from muxtune.runtime.peft import attach_task, prepare_examples
from muxtune.runtime.tokenizer import load_tokenizer
from muxtune.runtime.tracing import trace_backbone
from muxtune.specs import LoraSpec, PrefixTuningSpec, PromptTuningSpec


def case(
    name: str, spec: object, seed: int, lr: float, steps: int, batch_size: int, lengths: tuple[int, int]
) -> TaskCase:
    training = TaskTraining(name, spec, lr=lr, steps=steps, weight_decay=0.01, schedule="linear", seed=seed)
    return TaskCase(training, batch_size=batch_size, min_len=lengths[0], max_len=lengths[1])


LORA = case("lora", LoraSpec(r=4, alpha=8.0, target_modules=("q_proj", "v_proj")), 1, 3e-3, 10, 3, (6, 20))
PREFIX = case("prefix", PrefixTuningSpec(num_virtual_tokens=4), 2, 1e-2, 10, 3, (6, 18))
PROJECTED_SPEC = PrefixTuningSpec(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=24)
PROJECTED = case("projected", PROJECTED_SPEC, 3, 2e-3, 11, 2, (8, 24))
PROMPT = case("prompt", PromptTuningSpec(num_virtual_tokens=5), 4, 1e-2, 10, 3, (5, 16))
PROMPT_LEARNING = (PREFIX, PROJECTED, PROMPT)
CASES = (LORA, *PROMPT_LEARNING)
MAX_TOKENS = 48


def initial_states(model_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each task's seeded initialization (random prefixes and prompts, not a degenerate start)."""
    engine = MultiTaskEngine(load_model(str(model_dir)).model)
    return {c.training.name: engine.add_task(c.training).adapter_state() for c in CASES}


@pytest.fixture(scope="module")
def runs(tiny_llama_dir: Path) -> dict:
    vocab = load_model(str(tiny_llama_dir)).config.vocab_size
    init = initial_states(tiny_llama_dir)
    batches = {c.training.name: make_batches(c, vocab, data_seed=0) for c in CASES}
    fused = train_muxtune(tiny_llama_dir, CASES, init, batches, max_tokens=MAX_TOKENS)
    alone = {c.training.name: train_muxtune(tiny_llama_dir, (c,), init, batches, 10**6)[c.training.name] for c in CASES}
    return {"init": init, "batches": batches, "fused": fused, "alone": alone, "vocab": vocab}


def test_parameters_are_stored_once_per_task(runs: dict) -> None:
    hidden = 24
    token_dim = 2 * 16  # kv heads x head dim of builtin:tiny-llama (GQA: peft's token_dim)
    shapes = {k: tuple(v.shape) for k, v in runs["init"]["projected"].items()}
    assert shapes == {
        "prompt_encoder.embedding.weight": (3, token_dim),
        "prompt_encoder.transform.0.weight": (hidden, token_dim),
        "prompt_encoder.transform.0.bias": (hidden,),
        "prompt_encoder.transform.2.weight": (2 * 2 * token_dim, hidden),
        "prompt_encoder.transform.2.bias": (2 * 2 * token_dim,),
    }
    assert {k: tuple(v.shape) for k, v in runs["init"]["prefix"].items()} == {
        "prompt_encoder.embedding.weight": (4, 2 * 2 * token_dim)
    }
    prompt_shapes = {k: tuple(v.shape) for k, v in runs["init"]["prompt"].items()}
    assert prompt_shapes == {"prompt_encoder.embedding.weight": (5, 64)}


@pytest.mark.parametrize("task", PROMPT_LEARNING + (LORA,), ids=lambda c: c.training.name)
def test_fused_equals_alone(task: TaskCase, runs: dict) -> None:
    name = task.training.name
    init = runs["init"][name]
    update = sum(float((runs["alone"][name][k] - init[k]).norm()) for k in init)
    assert update > 1e-3, "training did not move the adapter; the comparison would be vacuous"
    assert relative_update_difference(runs["fused"][name], runs["alone"][name], init) <= 1e-4


class VirtualTokensDropped(torch.nn.Module):
    """A prompt tuning peft model whose logits lose the P virtual token rows (peft prepends P
    positions; our loss, like peft's with labels, scores the real tokens only)."""

    def __init__(self, model: torch.nn.Module, num_virtual_tokens: int) -> None:
        super().__init__()
        self.model = model
        self.num_virtual_tokens = num_virtual_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return SimpleNamespace(logits=logits[:, self.num_virtual_tokens :])


def peft_config(spec: PrefixTuningSpec | PromptTuningSpec) -> peft.PeftConfig:
    if isinstance(spec, PromptTuningSpec):
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.num_virtual_tokens)
    return peft.PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=spec.num_virtual_tokens,
        prefix_projection=spec.prefix_projection,
        encoder_hidden_size=spec.encoder_hidden_size,
    )


def peft_state(model: peft.PeftModel) -> dict[str, torch.Tensor]:
    """peft's trainable tensors keyed like MuxTune's (`prompt_encoder.<param>`)."""
    return {
        name.replace(".default.", "."): p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("task", PROMPT_LEARNING, ids=lambda c: c.training.name)
def test_alone_equals_transformers_peft(task: TaskCase, runs: dict, tiny_llama_dir: Path) -> None:
    name, spec = task.training.name, task.training.peft
    init = runs["init"][name]
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model = peft.get_peft_model(base, peft_config(spec))
    assert set(peft_state(model)) == set(init)
    model.prompt_encoder["default"].load_state_dict({k.removeprefix("prompt_encoder."): v for k, v in init.items()})
    trained = VirtualTokensDropped(model, spec.num_virtual_tokens) if isinstance(spec, PromptTuningSpec) else model
    train_peft_model(trained, task.training, runs["batches"][name])
    reference = peft_state(model)
    assert relative_update_difference(runs["alone"][name], reference, init) <= 1e-3
    assert relative_update_difference(runs["fused"][name], reference, init) <= 1e-3


def packed_logits_against_peft(model_dir: Path, spec: object, state: dict, vocab: int) -> None:
    """Our logits with `state` attached equal peft's with the exported directory, sequence by
    sequence; a sequence of another task in the same buffer keeps the plain backbone's logits."""
    model, config = load_backbone(model_dir, torch.float32)
    load_task_state("t", attach_task(model, "t", spec, seed=0, dropout_generator=torch.Generator()), state)
    adapter = save_adapter(tempfile.mkdtemp(), spec, state, base_model=str(model_dir), backbone=config)
    generator = torch.Generator().manual_seed(5)
    lengths = (6, 11, 4)
    examples = [
        Example(i, tuple(torch.randint(2, vocab, (n,), generator=generator).tolist()), (False,) + (True,) * (n - 1))
        for i, n in enumerate(lengths)
    ]
    laid_out = prepare_examples(spec, examples[:2])
    mb = build_microbatch([("t", e) for e in laid_out] + [("other", examples[2])], scored_output_rows=False)
    with torch.no_grad():
        ours = model(mb.input_ids_T, mb.position_ids_T, mb.layout)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    bounds = mb.layout.cu_seqlens_S1.tolist()
    with torch.no_grad():
        plain = hf(input_ids=torch.tensor([examples[2].input_ids])).logits[0]
        torch.testing.assert_close(ours[bounds[2] : bounds[3]], plain, atol=1e-5, rtol=0)
        reference = peft.PeftModel.from_pretrained(hf, str(adapter))
        for i, example in enumerate(examples[:2]):
            ids = torch.tensor([example.input_ids])
            theirs = reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            torch.testing.assert_close(ours[bounds[i] : bounds[i + 1]], theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("task", PROMPT_LEARNING, ids=lambda c: c.training.name)
def test_export_loads_in_peft_with_same_logits(task: TaskCase, runs: dict, tiny_llama_dir: Path) -> None:
    packed_logits_against_peft(tiny_llama_dir, task.training.peft, runs["fused"][task.training.name], runs["vocab"])


@pytest.mark.parametrize("family", ["gpt2", "opt_pre_ln"])
def test_export_loads_in_peft_with_same_logits_other_families(family: str, tmp_path: Path) -> None:
    hf_model(family).save_pretrained(tmp_path)
    model, _ = load_backbone(tmp_path, torch.float32)
    engine = MultiTaskEngine(model)
    for task in PROMPT_LEARNING:
        state = engine.add_task(task.training).adapter_state()
        packed_logits_against_peft(tmp_path, task.training.peft, state, VOCAB)


def test_adapter_files_load_back(runs: dict, tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = load_model(str(tiny_llama_dir)).config
    for task in (PREFIX, PROMPT):
        state = runs["fused"][task.training.name]
        path = save_adapter(tmp_path / task.training.name, task.training.peft, state, base_model="m", backbone=config)
        spec, loaded = load_adapter(path)
        assert spec == task.training.peft
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    state = runs["fused"]["projected"]
    path = save_adapter(tmp_path / "projected", PROJECTED.training.peft, state, base_model="m", backbone=config)
    with pytest.raises(AdapterError, match=r"adapter_config\.json: prefix_projection is true"):
        load_adapter(path)


@pytest.fixture
def single_intra_op_thread():
    """With one thread every GEMM row's result depends on that row only (see test_fused_training)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_prompt_learning_data_leaves_lora_bitwise_identical(
    runs: dict, tiny_llama_dir: Path, single_intra_op_thread: None
) -> None:
    cases = (LORA, PREFIX, PROMPT)
    batches = runs["batches"]
    reference = train_muxtune(tiny_llama_dir, cases, runs["init"], batches, max_tokens=MAX_TOKENS)
    changed = {**batches, **{c.training.name: make_batches(c, runs["vocab"], data_seed=7) for c in cases[1:]}}
    other = train_muxtune(tiny_llama_dir, cases, runs["init"], changed, max_tokens=MAX_TOKENS)
    for key, value in reference["lora"].items():
        assert torch.equal(other["lora"][key], value), f"lora.{key} changed with the prompt learning tasks' data"
    for name in ("prefix", "prompt"):
        assert any(not torch.equal(other[name][k], v) for k, v in reference[name].items())


@pytest.mark.parametrize("num_virtual_tokens", [3, 40])  # the text's tokens cut, and repeated
def test_text_init_equals_peft(num_virtual_tokens: int, tiny_llama_dir: Path) -> None:
    text = "Answer the question about the story"
    tokenizer = load_tokenizer(tiny_llama_dir)
    encode = lambda t: tokenizer.encode(t, add_special_tokens=True)  # noqa: E731 (the job's encode)
    assert 3 < len(encode(text)) < 40
    spec = PromptTuningSpec(
        num_virtual_tokens=num_virtual_tokens, prompt_tuning_init="TEXT", prompt_tuning_init_text=text
    )
    engine = MultiTaskEngine(load_model(str(tiny_llama_dir)).model, encode=encode)
    ours = engine.add_task(TaskTraining("text", spec, lr=1e-3, steps=1)).adapter_state()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    config = peft.PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tiny_llama_dir),
    )
    theirs = peft_state(peft.get_peft_model(base, config))
    assert torch.equal(ours["prompt_encoder.embedding.weight"], theirs["prompt_encoder.embedding.weight"])


def test_meta_backbone_attaches_and_traces(tiny_llama_dir: Path) -> None:
    """The compiler's checks: a meta backbone (TEXT init without a tokenizer), fx leaves that
    carry the tasks, and virtual tokens in the laid-out sequences."""
    config = load_model(str(tiny_llama_dir)).config
    model = build_model(BackboneConfig.from_dict(config.to_dict()), device="meta")
    specs = {
        "prefix": PROJECTED.training.peft,
        "prompt": PromptTuningSpec(
            num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="some words"
        ),
    }
    for name, spec in specs.items():
        attach_task(model, name, spec, seed=0, dropout_generator=torch.Generator())
    traced = trace_backbone(model, head=False)
    carried = {
        str(node.target): set(traced.get_submodule(str(node.target)).adapters)
        for node in traced.graph.nodes
        if node.op == "call_module" and carries_peft(traced.get_submodule(str(node.target)))
    }
    assert carried == {
        "backbone.model.embed_tokens": {"prompt"},
        "backbone.model.layers.0.self_attn.attention": {"prefix"},
        "backbone.model.layers.1.self_attn.attention": {"prefix"},
    }
    example = Example(0, (5, 6, 7), (False, True, True))
    prompt, prefix = prepare_examples(specs["prompt"], [example])[0], prepare_examples(specs["prefix"], [example])[0]
    assert prompt == dataclasses.replace(example, input_ids=(0,) * 4 + (5, 6, 7), is_target=(False,) * 5 + (True,) * 2)
    assert prefix == dataclasses.replace(example, first_position=3)
    assert build_microbatch([("p", prefix)]).position_ids_T.tolist() == [3, 4, 5]
