"""Tokenization exactly as DESIGN section 8 defines it, and the per-task batch stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from muxtune.runtime.data import DataError, batch_indices, load_dataset
from muxtune.runtime.layout import Segment
from muxtune.runtime.packing import IGNORE_INDEX, build_microbatch, split_task_batch
from muxtune.runtime.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    return load_tokenizer(tiny_llama_dir)


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_completion_tokenization(tokenizer, tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [{"prompt": "Review: good\nSentiment:", "completion": " positive"}])
    example = load_dataset(path, "prompt_completion", tokenizer, 128).examples[0]
    prompt = tokenizer.encode("Review: good\nSentiment:", add_special_tokens=True)
    completion = tokenizer.encode(" positive", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert prompt[0] == 0, "the tiny tokenizer adds BOS with special tokens"
    assert list(example.input_ids) == prompt + completion
    assert list(example.is_target) == [False] * len(prompt) + [True] * len(completion)


def test_text_tokenization_and_truncation(tokenizer, tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [{"text": "one two three four five six seven"}])
    full = tokenizer.encode("one two three four five six seven", add_special_tokens=True) + [tokenizer.eos_token_id]
    example = load_dataset(path, "text", tokenizer, 5).examples[0]
    assert list(example.input_ids) == full[:5]
    assert example.is_target == (False, True, True, True, True)


def test_a_file_is_tokenized_record_by_record_rule(tokenizer, tmp_path: Path) -> None:
    """Tokenizing a whole file at once gives each line what the rule gives it alone."""
    pairs = [("", " yes"), ("Über naïve café 🙂\n", ""), ("a " * 300, " b"), ("   ", "\t\n"), ("x", " " + "long " * 50)]
    path = write(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in pairs])
    examples = load_dataset(path, "prompt_completion", tokenizer, 96).examples
    eos = [tokenizer.eos_token_id]
    for index, ((prompt, completion), example) in enumerate(zip(pairs, examples)):
        p = tokenizer.encode(prompt, add_special_tokens=True)
        ids = (p + tokenizer.encode(completion, add_special_tokens=False) + eos)[:96]
        assert example.index == index and list(example.input_ids) == ids
        assert list(example.is_target) == [i >= len(p) and i > 0 for i in range(len(ids))]
    texts = [p + c for p, c in pairs]
    path = write(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    for text, example in zip(texts, load_dataset(path, "text", tokenizer, 96).examples):
        assert list(example.input_ids) == (tokenizer.encode(text, add_special_tokens=True) + eos)[:96]


def test_examples_cut_to_no_target_are_counted_not_used(tokenizer, tmp_path: Path) -> None:
    path = write(
        tmp_path / "d.jsonl", [{"prompt": "word " * 40, "completion": " yes"}, {"prompt": "hi", "completion": " yes"}]
    )
    dataset = load_dataset(path, "prompt_completion", tokenizer, 16)
    assert dataset.num_targetless == 1 and [e.index for e in dataset.usable] == [1]
    with pytest.raises(DataError, match="no example keeps a target token"):
        load_dataset(
            write(tmp_path / "e.jsonl", [{"prompt": "word " * 40, "completion": " yes"}]),
            "prompt_completion",
            tokenizer,
            16,
        )


def test_batch_stream_is_deterministic_and_runs_through_epochs() -> None:
    first = [b for _, b in zip(range(7), batch_indices(10, 4, seed=3))]
    again = [b for _, b in zip(range(7), batch_indices(10, 4, seed=3))]
    other = [b for _, b in zip(range(7), batch_indices(10, 4, seed=4))]
    assert first == again and first != other
    flat = [i for b in first for i in b]
    assert all(len(b) == 4 for b in first)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def test_packing_targets_positions_and_splits(tokenizer, tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [{"prompt": "a b", "completion": " c"}, {"prompt": "d", "completion": " e f"}])
    examples = list(load_dataset(path, "prompt_completion", tokenizer, 64).examples)
    mb = build_microbatch([("x", examples[0]), ("x", examples[1])])
    lengths = [len(e.input_ids) for e in examples]
    assert mb.layout.cu_seqlens_S1.tolist() == [0, lengths[0], sum(lengths)]
    assert mb.layout.segments == (Segment("x", 0, sum(lengths)),) and mb.num_tokens == sum(lengths)
    assert mb.position_ids_T.tolist() == list(range(lengths[0])) + list(range(lengths[1]))
    for start, e in zip((0, lengths[0]), examples):
        for i in range(len(e.input_ids)):
            expected = e.input_ids[i + 1] if i + 1 < len(e.input_ids) and e.is_target[i + 1] else IGNORE_INDEX
            assert mb.targets_T[start + i].item() == expected
    assert [len(p) for p in split_task_batch(examples * 3, lengths[0] + lengths[1])] == [2, 2, 2]
