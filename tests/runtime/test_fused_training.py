"""The central property: a task trained fused with others equals the task trained alone,
in MuxTune's single-task mode and in transformers + peft (DESIGN section 4)."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from muxtune.runtime.adapters import load_adapter, save_adapter
from muxtune.runtime.backbone import load_model
from muxtune.runtime.data import Example
from muxtune.runtime.engine import MultiTaskEngine, TaskTraining
from muxtune.specs import LoraSpec
from muxtune.tools.hf_batches import padded_batch, padded_batch_loss

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TaskCase:
    training: TaskTraining
    batch_size: int
    min_len: int
    max_len: int


TASKS = (
    TaskCase(
        TaskTraining(
            "alpha",
            LoraSpec("lora", 4, 8.0, 0.0, ("q_proj", "v_proj")),
            lr=3e-3,
            steps=10,
            schedule="constant",
            warmup_steps=2,
            weight_decay=0.01,
            max_grad_norm=1.0,
            seed=1,
        ),
        batch_size=3,
        min_len=6,
        max_len=20,
    ),
    TaskCase(
        TaskTraining(
            "beta",
            LoraSpec("lora", 8, 16.0, 0.0, ALL_LINEAR, use_rslora=True),
            lr=1e-3,
            steps=12,
            schedule="linear",
            warmup_steps=3,
            weight_decay=0.0,
            max_grad_norm=0.5,
            seed=2,
        ),
        batch_size=2,
        min_len=20,
        max_len=48,
    ),
    TaskCase(
        TaskTraining(
            "gamma",
            LoraSpec("lora", 2, 4.0, 0.0, ("o_proj", "down_proj")),
            lr=5e-3,
            steps=11,
            schedule="cosine",
            warmup_steps=0,
            weight_decay=0.1,
            max_grad_norm=2.0,
            seed=3,
        ),
        batch_size=4,
        min_len=4,
        max_len=12,
    ),
)


def make_batches(case: TaskCase, vocab_size: int, data_seed: int) -> list[list[Example]]:
    """Random prompt/completion sequences: a prompt prefix without loss, a scored completion."""
    rng = random.Random(f"{case.training.name}:{data_seed}")
    batches, index = [], 0
    for _ in range(case.training.steps):
        batch = []
        for _ in range(case.batch_size):
            length = rng.randint(case.min_len, case.max_len)
            prompt = rng.randint(1, length - 2)
            ids = tuple(rng.randrange(2, vocab_size) for _ in range(length))
            batch.append(Example(index, ids, tuple(i >= prompt for i in range(length))))
            index += 1
        batches.append(batch)
    return batches


@pytest.fixture(scope="module")
def init_adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """peft adapter directories with non-zero B, one per task, used as `init_from`."""
    loaded = load_model(str(tiny_llama_dir))
    engine = MultiTaskEngine(loaded.model)
    root = tmp_path_factory.mktemp("init-adapters")
    generator = torch.Generator().manual_seed(99)
    paths = {}
    for case in TASKS:
        state = engine.add_task(case.training)
        with torch.no_grad():
            for module in state.modules.values():
                module.lora_B.weight.copy_(0.05 * torch.randn(module.lora_B.weight.shape, generator=generator))
        paths[case.training.name] = save_adapter(
            root / case.training.name,
            case.training.peft,
            state.adapter_state(),
            base_model=str(tiny_llama_dir),
            backbone=loaded.config,
        )
    return paths


def train_muxtune(
    model_dir: Path,
    cases: tuple[TaskCase, ...],
    init: dict[str, Path],
    batches: dict[str, list[list[Example]]],
    max_tokens: int,
) -> dict[str, dict[str, torch.Tensor]]:
    """Train `cases` together (fused rounds) and return each task's final adapter state."""
    loaded = load_model(str(model_dir))
    engine = MultiTaskEngine(loaded.model)
    for case in cases:
        _, state = load_adapter(init[case.training.name])
        engine.add_task(case.training, init_state=state)
    for round_index in range(max(c.training.steps for c in cases)):
        round_batches = {
            c.training.name: batches[c.training.name][round_index] for c in cases if round_index < c.training.steps
        }
        for result in engine.train_round(round_batches, {name: max_tokens for name in round_batches}):
            assert not result.diverged and math.isfinite(result.loss)
    return {name: state.adapter_state() for name, state in engine.tasks.items()}


def relative_update_difference(final: dict, reference: dict, init: dict) -> float:
    num = sum(float((final[k] - reference[k]).norm() ** 2) for k in init)
    den = sum(float((reference[k] - init[k]).norm() ** 2) for k in init)
    return math.sqrt(num / den)


@pytest.fixture(scope="module")
def runs(tiny_llama_dir: Path, init_adapters: dict[str, Path]) -> dict:
    vocab = load_model(str(tiny_llama_dir)).config.vocab_size
    batches = {c.training.name: make_batches(c, vocab, data_seed=0) for c in TASKS}
    fused = train_muxtune(tiny_llama_dir, TASKS, init_adapters, batches, max_tokens=40)
    alone = {
        c.training.name: train_muxtune(tiny_llama_dir, (c,), init_adapters, batches, 10**6)[c.training.name]
        for c in TASKS
    }
    return {"batches": batches, "fused": fused, "alone": alone, "vocab": vocab}


@pytest.mark.parametrize("case", TASKS, ids=lambda c: c.training.name)
def test_fused_equals_alone(case: TaskCase, runs: dict, init_adapters: dict[str, Path]) -> None:
    name = case.training.name
    _, init = load_adapter(init_adapters[name])
    update = sum(float((runs["alone"][name][k] - init[k]).norm()) for k in init)
    assert update > 1e-3, "training did not move the adapter; the comparison would be vacuous"
    assert relative_update_difference(runs["fused"][name], runs["alone"][name], init) <= 1e-4


def train_transformers_peft(model_dir: Path, case: TaskCase, adapter_dir: Path, batches: list[list[Example]]) -> dict:
    """Reference: the same task alone in transformers + peft, with DESIGN section 8's definitions."""
    import transformers
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = case.training
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    factory = {
        "constant": lambda: transformers.get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps),
        "linear": lambda: transformers.get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps),
        "cosine": lambda: transformers.get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps),
    }
    scheduler = factory[cfg.schedule]()
    for batch in batches:
        ids, mask, labels = padded_batch(batch)
        padded_batch_loss(model(input_ids=ids, attention_mask=mask).logits, labels).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    prefix = "base_model.model."
    return {
        name[len(prefix) :].replace(".default.", "."): p.detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


@pytest.mark.parametrize("case", TASKS, ids=lambda c: c.training.name)
def test_alone_equals_transformers_peft(case: TaskCase, runs: dict, tiny_llama_dir: Path, init_adapters) -> None:
    name = case.training.name
    _, init = load_adapter(init_adapters[name])
    reference = train_transformers_peft(tiny_llama_dir, case, init_adapters[name], runs["batches"][name])
    assert set(reference) == set(init)
    assert relative_update_difference(runs["alone"][name], reference, init) <= 1e-3
    assert relative_update_difference(runs["fused"][name], reference, init) <= 1e-3


@pytest.fixture
def single_intra_op_thread():
    """Multi-threaded MKL picks GEMM partitions by shape, which can change a row's rounding
    when other rows change; with one thread every row's result depends on that row only."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_changing_one_task_data_leaves_others_bitwise_identical(
    runs: dict, tiny_llama_dir: Path, init_adapters: dict[str, Path], single_intra_op_thread: None
) -> None:
    batches = runs["batches"]
    reference = train_muxtune(tiny_llama_dir, TASKS, init_adapters, batches, max_tokens=40)
    changed = {**batches, "beta": make_batches(TASKS[1], runs["vocab"], data_seed=7)}
    other = train_muxtune(tiny_llama_dir, TASKS, init_adapters, changed, max_tokens=40)
    for name in ("alpha", "gamma"):
        for key, value in reference[name].items():
            assert torch.equal(other[name][key], value), f"{name}.{key} changed with beta's data"
    assert any(not torch.equal(other["beta"][k], v) for k, v in reference["beta"].items())


def test_changing_one_task_data_keeps_others_within_reduction_order(
    runs: dict, tiny_llama_dir: Path, init_adapters: dict[str, Path]
) -> None:
    changed = {**runs["batches"], "beta": make_batches(TASKS[1], runs["vocab"], data_seed=7)}
    other = train_muxtune(tiny_llama_dir, TASKS, init_adapters, changed, max_tokens=40)
    for name in ("alpha", "gamma"):
        for key, value in runs["fused"][name].items():
            torch.testing.assert_close(other[name][key], value, rtol=1e-5, atol=1e-7)


def test_dropout_masks_belong_to_the_task(tiny_llama_dir: Path, init_adapters: dict[str, Path]) -> None:
    """With dropout, a task fused with others equals the task alone: its masks come from its own
    random stream, not from a global one the other tasks also draw from."""
    noisy = TaskCase(
        TaskTraining("alpha", LoraSpec("lora", 4, 8.0, 0.3, ("q_proj", "v_proj")), lr=3e-3, steps=4, seed=1),
        batch_size=3,
        min_len=6,
        max_len=20,
    )
    cases = (noisy, TASKS[1])
    vocab = load_model(str(tiny_llama_dir)).config.vocab_size
    batches = {c.training.name: make_batches(c, vocab, data_seed=0) for c in cases}
    fused = train_muxtune(tiny_llama_dir, cases, init_adapters, batches, max_tokens=40)["alpha"]
    alone = train_muxtune(tiny_llama_dir, (noisy,), init_adapters, batches, max_tokens=40)["alpha"]
    plain = dataclasses.replace(
        noisy, training=dataclasses.replace(noisy.training, peft=dataclasses.replace(noisy.training.peft, dropout=0.0))
    )
    without_dropout = train_muxtune(tiny_llama_dir, (plain,), init_adapters, batches, max_tokens=40)["alpha"]
    for key, value in alone.items():
        torch.testing.assert_close(fused[key], value, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(without_dropout[k], v) for k, v in alone.items()), "dropout had no effect"
