"""Held-out evaluation: the exact-match rule, unseen examples, and the batched draft-checked
generation giving the verdicts of plain greedy generation."""

from __future__ import annotations

import itertools

import pytest
import torch
from user_path import DATA

from muxtune.common.errors import UserError
from muxtune.runtime.backbone import greedy_generate, load_model
from muxtune.runtime.engine import MultiTaskEngine, TaskTraining
from muxtune.specs.peft import LoraSpec
from muxtune.tools.heldout_eval import (
    HELDOUT_SEED,
    Generation,
    answer_text,
    heldout_examples,
    is_exact_match,
    is_single_word_task,
    run_generations,
    training_prompts,
    verdict_is_settled,
)
from muxtune.tools.make_datasets import DATASETS, make_examples


@pytest.mark.parametrize(
    "generated, expected, right",
    [
        (" positive", " positive", True),
        ("positive", " positive", True),
        (" positive.", " positive", True),
        (" positive\n\nReview: I loved it", " positive", True),
        ("\n\n  entailment because", " entailment", True),
        (" (B)", " B", True),
        (" B. The door", " B", True),
        (" Positive", " positive", False),
        (" positively", " positive", False),
        (" not positive", " positive", False),
        (" .positive", " positive", True),
        (" . positive", " positive", False),
        ("", " positive", False),
        (" ...", " positive", False),
    ],
)
def test_first_word_rule(generated: str, expected: str, right: bool) -> None:
    assert is_exact_match(generated, expected, first_word_only=True) is right


@pytest.mark.parametrize(
    "generated, expected, right",
    [
        (" 3 5 9", " 3 5 9", True),
        ("3  5\t9  ", " 3 5 9", True),
        ("\n\n 3 5 9\nInstruction: sort", " 3 5 9", True),
        (" 3 5", " 3 5 9", False),
        (" 3 5 9 11", " 3 5 9", False),
        (" 3 5 9.", " 3 5 9", False),
        (" APPLE pear", " apple pear", False),
        ("\n 3 5\n9", " 3 5 9", False),
        ("", " 3 5 9", False),
    ],
)
def test_whole_answer_rule(generated: str, expected: str, right: bool) -> None:
    assert is_exact_match(generated, expected, first_word_only=False) is right


def test_single_word_tasks_are_the_classification_ones() -> None:
    for task in ("sentiment", "qa", "entailment"):
        assert is_single_word_task([e["completion"] for e in make_examples(task, HELDOUT_SEED, 50)])
    assert not is_single_word_task([e["completion"] for e in make_examples("instructions", HELDOUT_SEED, 50)])


@pytest.mark.parametrize("first_word_only, expected", [(True, " ab"), (True, " a."), (False, " a b"), (False, " ab")])
def test_a_settled_verdict_never_changes(first_word_only: bool, expected: str) -> None:
    """Stopping early is sound: once settled, no continuation changes the verdict."""
    alphabet = ["a", "b", " ", "\n", "."]
    words = ["".join(chars) for size in range(5) for chars in itertools.product(alphabet, repeat=size)]
    settled_any = False
    for text in words:
        if not verdict_is_settled(text, expected, first_word_only):
            continue
        settled_any = True
        verdict = is_exact_match(text, expected, first_word_only)
        for tail in words[:156]:  # every continuation of up to 3 characters
            assert is_exact_match(text + tail, expected, first_word_only) is verdict, (text, tail)
    assert settled_any
    assert not verdict_is_settled(expected[:2], expected, first_word_only)


def test_heldout_examples_are_never_training_examples() -> None:
    for task, (file_name, _, _) in DATASETS.items():
        trained = training_prompts(DATA / file_name)
        held_out = heldout_examples(task, 50, trained)
        prompts = [e["prompt"] for e in held_out]
        assert len(prompts) == 50 and len(set(prompts)) == 50
        assert not set(prompts) & trained, f"{task}: held-out prompts in {file_name}"
        assert held_out == heldout_examples(task, 50, trained), "held-out examples must be deterministic"


def test_excluded_prompts_are_replaced_by_other_unseen_ones() -> None:
    first = heldout_examples("sentiment", 20, set())
    excluded = {e["prompt"] for e in first[:5]}
    again = heldout_examples("sentiment", 20, excluded)
    assert len(again) == 20 and not {e["prompt"] for e in again} & excluded


def test_unknown_task_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no held-out example generator"):
        heldout_examples("summaries", 5, set())


def test_batched_generation_gives_plain_greedy_verdicts() -> None:
    """On builtin:tiny-llama with a random adapter: the draft-checked, packed, early-stopped
    generation reaches the verdict of `greedy_generate` run to the token limit, its text is a
    prefix of that generation, and a model's own greedy answer is scored right."""
    loaded = load_model("builtin:tiny-llama")
    engine = MultiTaskEngine(loaded.model)
    state = engine.add_task(TaskTraining("tuned", LoraSpec(r=4, target_modules=("q_proj", "v_proj")), 1e-3, 1))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in state.parameters:
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    loaded.model.eval()
    limit = 8
    cases = []
    for task in ("sentiment", "instructions"):
        first_word_only = task == "sentiment"
        for example in make_examples(task, HELDOUT_SEED, 3):
            for adapter in (None, "tuned"):
                plain = greedy_generate(loaded, example["prompt"], task=adapter, max_new_tokens=limit)
                own_answer = " " + answer_text(plain, first_word_only)
                for expected in (example["completion"], own_answer):
                    cases.append((example["prompt"], adapter, expected, first_word_only, plain))
    generations = [
        Generation(
            adapter=adapter,
            prompt_ids=loaded.tokenizer.encode(prompt, add_special_tokens=True),
            expected=expected,
            draft_ids=loaded.tokenizer.encode(expected, add_special_tokens=False),
            max_new_tokens=limit,
            first_word_only=first_word_only,
        )
        for prompt, adapter, expected, first_word_only, _ in cases
    ]
    run_generations(loaded, generations)
    for generation, (_, _, expected, first_word_only, plain) in zip(generations, cases):
        assert generation.finished
        assert plain.startswith(generation.text), (generation.text, plain)
        assert generation.correct is is_exact_match(plain, expected, first_word_only), (expected, plain)
    assert any(g.correct for g in generations) and not all(g.correct for g in generations)
