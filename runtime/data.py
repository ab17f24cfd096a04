"""Task datasets: JSONL reading, tokenization exactly as the spec defines it, batch streams.

Tokenization (DESIGN section 8): `text`: ids = encode(text, specials) + [eos], loss on every
predicted position. `prompt_completion`: p = encode(prompt, specials), c = encode(completion,
no specials) + [eos], ids = (p + c)[:max_seq_len], loss only on positions predicting a token of c.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from muxtune.common.errors import UserError
from muxtune.common.text import clip_line, quote

from .tokenizer import TextTokenizer

FORMAT_FIELDS = {"text": ("text",), "prompt_completion": ("prompt", "completion")}
MAX_INT_DIGITS = 4300
"""Digits a JSON integer may have (Python's default limit for converting decimal text to int)."""
_SURROGATE = re.compile("[\ud800-\udfff]")


class DataError(UserError):
    """A dataset file that cannot be used, with the file (and line) named."""


@dataclass(frozen=True)
class Example:
    """One tokenized sequence: `input_ids` and which of them are targets of the loss.

    `first_position` is the position id of its first token (positions run on from there): 0,
    except for methods whose learned prefix occupies the positions before it (prefix tuning)."""

    index: int  # 0-based line number in the dataset file
    input_ids: tuple[int, ...]
    is_target: tuple[bool, ...]  # is_target[i]: token i is predicted by position i-1 and scored
    first_position: int = 0

    @property
    def num_targets(self) -> int:
        return sum(self.is_target)


@dataclass(frozen=True)
class TokenizedDataset:
    """All examples of one task's file; `usable` are those keeping at least one target token."""

    path: Path
    examples: tuple[Example, ...]

    @property
    def usable(self) -> tuple[Example, ...]:
        return tuple(e for e in self.examples if e.num_targets > 0)

    @property
    def num_targetless(self) -> int:
        return len(self.examples) - len(self.usable)


def tokenize_records(
    records: list[dict], data_format: str, tokenizer: TextTokenizer, max_seq_len: int
) -> tuple[Example, ...]:
    """Tokenize parsed JSONL records (a file's lines, in order) by the format's rule."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if data_format == "text":
        texts = tokenizer.encode_many([r["text"] for r in records], add_special_tokens=True)
        return tuple(_example(i, [], ids + eos, max_seq_len) for i, ids in enumerate(texts))
    prompts = tokenizer.encode_many([r["prompt"] for r in records], add_special_tokens=True)
    completions = tokenizer.encode_many([r["completion"] for r in records], add_special_tokens=False)
    return tuple(_example(i, p, c + eos, max_seq_len) for i, (p, c) in enumerate(zip(prompts, completions)))


def _example(index: int, prompt: list[int], scored: list[int], max_seq_len: int) -> Example:
    """``(prompt + scored)[:max_seq_len]``, positions predicting a token of ``scored`` as targets
    (the first token is never one: nothing predicts it)."""
    ids = (prompt + scored)[:max_seq_len]
    is_target = tuple(i >= len(prompt) and i > 0 for i in range(len(ids)))
    return Example(index=index, input_ids=tuple(ids), is_target=is_target)


def read_jsonl(path: Path, data_format: str) -> list[dict]:
    """Parse a JSONL file, checking every line has the format's string fields.

    Lines end at ``\\n``, ``\\r\\n`` or ``\\r``; each is decoded as UTF-8 on its own, so every problem
    (bad bytes, bad JSON, numbers too long, nesting too deep, lone surrogates) is a DataError
    naming the file and line."""
    if data_format not in FORMAT_FIELDS:
        raise DataError(f"{path}: unknown data format {quote(data_format)}; expected one of {sorted(FORMAT_FIELDS)}")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file")
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    records: list[dict] = []
    try:
        with path.open("rb") as handle:
            for line_number, raw_line in enumerate(_lines(handle), start=1):
                records.append(_parse_line(raw_line, path, line_number, data_format))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the data file: {exc.strerror or exc}") from None
    if not records:
        raise DataError(f"{path}: the dataset is empty")
    return records


def _lines(handle: BinaryIO) -> Iterator[bytes]:
    """The lines of a binary file without their endings (``\\n``, ``\\r\\n`` or ``\\r``, as text mode reads)."""
    for chunk in handle:
        yield from chunk.splitlines()


class _NumberTooLong(Exception):
    """Raised by `_parse_int` to stop parsing a line at an integer literal that is too long."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _NumberTooLong(digits)
    return int(text)


def _parse_line(raw: bytes, path: Path, line_number: int, data_format: str) -> dict:
    """One JSONL line as a record holding the format's fields as valid Unicode strings."""
    where = f"{path}:{line_number}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{where}: not valid UTF-8 text (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line)"
        ) from None
    if not line.strip():
        raise DataError(f"{where}: empty line (every line must be one JSON object)")
    try:
        record = json.loads(line, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except _NumberTooLong as exc:
        raise DataError(f"{where}: a number has {exc.digits} digits (at most {MAX_INT_DIGITS} are accepted)") from None
    except RecursionError:
        raise DataError(f"{where}: invalid JSON: nested too deeply") from None
    except ValueError as exc:
        raise DataError(f"{where}: invalid JSON: {clip_line(str(exc), 200)}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name in FORMAT_FIELDS[data_format]:
        value = record.get(name)
        if not isinstance(value, str):
            problem = "missing" if name not in record else f"must be a string, got {type(value).__name__}"
            raise DataError(f"{where}: field {name!r} {problem} (format {data_format})")
        surrogate = _SURROGATE.search(value)
        if surrogate:
            raise DataError(
                f"{where}: field {name!r} holds a lone surrogate \\u{ord(surrogate.group()):04x} at character "
                f"{surrogate.start() + 1}, which is not valid Unicode text"
            )
    return record


def load_dataset(path: str | Path, data_format: str, tokenizer: TextTokenizer, max_seq_len: int) -> TokenizedDataset:
    """Read and tokenize a task's dataset; an error when no example keeps a target token."""
    path = Path(path)
    records = read_jsonl(path, data_format)
    dataset = TokenizedDataset(path=path, examples=tokenize_records(records, data_format, tokenizer, max_seq_len))
    if not dataset.usable:
        raise DataError(
            f"{path}: no example keeps a target token within max_seq_len={max_seq_len} "
            "(prompts fill the whole sequence); raise max_seq_len or shorten the prompts"
        )
    return dataset


def batch_indices(num_examples: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless stream of global batches (positions into the usable examples).

    Each epoch is a fresh permutation drawn from the task seed and the epoch number; batches
    run across epoch boundaries, so every batch has exactly `batch_size` examples.
    """
    epoch = 0
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            order = list(range(num_examples))
            random.Random(f"muxtune:{seed}:{epoch}").shuffle(order)
            pending.extend(order)
            epoch += 1
        yield pending[:batch_size]
        pending = pending[batch_size:]
