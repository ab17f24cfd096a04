"""The central property: a task trained fused with others equals the task trained alone,
in MuxTune's single-task mode and in transformers + peft (DESIGN section 4), for LoRA tasks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from training_cases import TaskCase, make_batches, relative_update_difference, train_muxtune, train_transformers_peft

from muxtune.kernels import lora_dispatch
from muxtune.runtime.adapters import load_adapter, save_adapter
from muxtune.runtime.backbone import load_model
from muxtune.runtime.engine import MultiTaskEngine, TaskTraining
from muxtune.specs import LoraSpec

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


@pytest.fixture(scope="module")
def init_states(init_adapters: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    """The initial adapters' states, by task."""
    return {name: load_adapter(path)[1] for name, path in init_adapters.items()}


@pytest.fixture(scope="module")
def runs(tiny_llama_dir: Path, init_states: dict) -> dict:
    vocab = load_model(str(tiny_llama_dir)).config.vocab_size
    batches = {c.training.name: make_batches(c, vocab, data_seed=0) for c in TASKS}
    fused = train_muxtune(tiny_llama_dir, TASKS, init_states, batches, max_tokens=40)
    alone = {
        c.training.name: train_muxtune(tiny_llama_dir, (c,), init_states, batches, 10**6)[c.training.name]
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
    runs: dict, tiny_llama_dir: Path, init_states: dict, single_intra_op_thread: None
) -> None:
    batches = runs["batches"]
    reference = train_muxtune(tiny_llama_dir, TASKS, init_states, batches, max_tokens=40)
    changed = {**batches, "beta": make_batches(TASKS[1], runs["vocab"], data_seed=7)}
    other = train_muxtune(tiny_llama_dir, TASKS, init_states, changed, max_tokens=40)
    for name in ("alpha", "gamma"):
        for key, value in reference[name].items():
            assert torch.equal(other[name][key], value), f"{name}.{key} changed with beta's data"
    assert any(not torch.equal(other["beta"][k], v) for k, v in reference["beta"].items())


def test_changing_one_task_data_keeps_others_within_reduction_order(
    runs: dict, tiny_llama_dir: Path, init_states: dict
) -> None:
    changed = {**runs["batches"], "beta": make_batches(TASKS[1], runs["vocab"], data_seed=7)}
    other = train_muxtune(tiny_llama_dir, TASKS, init_states, changed, max_tokens=40)
    for name in ("alpha", "gamma"):
        for key, value in runs["fused"][name].items():
            torch.testing.assert_close(other[name][key], value, rtol=1e-5, atol=1e-7)


def test_dropout_masks_belong_to_the_task(tiny_llama_dir: Path, init_states: dict) -> None:
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
    fused = train_muxtune(tiny_llama_dir, cases, init_states, batches, max_tokens=40)["alpha"]
    alone = train_muxtune(tiny_llama_dir, (noisy,), init_states, batches, max_tokens=40)["alpha"]
    plain = dataclasses.replace(
        noisy, training=dataclasses.replace(noisy.training, peft=dataclasses.replace(noisy.training.peft, dropout=0.0))
    )
    without_dropout = train_muxtune(tiny_llama_dir, (plain,), init_states, batches, max_tokens=40)["alpha"]
    for key, value in alone.items():
        torch.testing.assert_close(fused[key], value, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(without_dropout[k], v) for k, v in alone.items()), "dropout had no effect"


def test_segmented_lora_path_equals_alone(
    runs: dict, tiny_llama_dir: Path, init_states: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path CUDA takes (every task's segments in one `segmented_lora` call per host), here
    with the torch reference forced on the CPU, trains what each task trains alone."""
    monkeypatch.setattr(lora_dispatch, "BACKEND", "torch")
    calls = []
    monkeypatch.setattr(lora_dispatch, "SegmentedLoraFunction", counting(lora_dispatch.SegmentedLoraFunction, calls))
    segmented = train_muxtune(tiny_llama_dir, TASKS, init_states, runs["batches"], max_tokens=40)
    assert calls and max(calls) >= 2, "hosts ran several tasks' segments in one segmented call"
    for case in TASKS:
        name = case.training.name
        init = init_states[name]
        assert relative_update_difference(segmented[name], runs["alone"][name], init) <= 1e-4, name


def counting(function: type, calls: list[int]) -> type:
    """`function` (an autograd Function) whose `apply` records how many slots each call has."""

    class Counted(function):
        @classmethod
        def apply(cls, *args):  # type: ignore[override]
            calls.append(args[5].num_slots)
            return function.apply(*args)

    return Counted
