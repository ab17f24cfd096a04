"""Held-out exact-match accuracy of a quickstart run: the base model against the adapted model.

Each task is scored on examples drawn from its generator (`make_datasets.make_examples`) with
`HELDOUT_SEED`, a seed the bundled training files were not made with, and any example whose
prompt is in the task's training file is dropped, so no scored prompt was trained on.

Answers are greedy generations, read by the rule of `is_exact_match`. Generation is batched
(many sequences packed into one backbone call, base and adapted side by side) and checks the
expected completion as a draft: one call over prompt + expected completion gives the greedy
token at every position of it, so a right answer costs one call instead of one per token. A
generation stops as soon as its verdict can no longer change, so the generated text kept for
display may be shorter than a full greedy continuation, but the verdict is the same (up to
rounding: packed calls may round differently from one-sequence calls, which can flip a near-tie).
"""

from __future__ import annotations

import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from muxtune.common.errors import UserError
from muxtune.common.text import aligned_columns
from muxtune.plans import Plan
from muxtune.runtime.adapters import load_adapter
from muxtune.runtime.backbone import LoadedBackbone, load_model
from muxtune.runtime.data import read_jsonl
from muxtune.runtime.engine import MultiTaskEngine
from muxtune.runtime.layout import MicroBatchLayout
from muxtune.runtime.task_runs import task_training

from .make_datasets import DATASETS, Example, make_examples

HELDOUT_SEED = 12345
"""Seed of the held-out examples; the bundled training files are made with seed 0."""
DEFAULT_EXAMPLES = 50
EXTRA_NEW_TOKENS = 4
"""Tokens generated beyond the task's longest expected completion."""
FORWARD_TOKEN_BUDGET = 2048
"""Tokens packed into one backbone call."""
MAX_DRAWS = 8
"""Held-out draws tried (each twice as large as the last) before giving up on finding enough examples."""


def training_prompts(data_path: Path) -> set[str]:
    """The prompts of a `prompt_completion` JSONL training file."""
    return {record["prompt"] for record in read_jsonl(Path(data_path), "prompt_completion")}


def heldout_examples(task: str, count: int, excluded_prompts: set[str], seed: int = HELDOUT_SEED) -> list[Example]:
    """`count` distinct examples of dataset `task` drawn with `seed`, none with a prompt in `excluded_prompts`."""
    if task not in DATASETS:
        raise UserError(f"{task}: no held-out example generator (known: {', '.join(DATASETS)})")
    draw = count
    for _ in range(MAX_DRAWS):
        kept: list[Example] = []
        seen = set(excluded_prompts)
        for example in make_examples(task, seed, draw):
            if example["prompt"] not in seen:
                seen.add(example["prompt"])
                kept.append(example)
        if len(kept) >= count:
            return kept[:count]
        draw *= 2
    raise UserError(f"{task}: only {len(kept)} of {draw // 2} drawn examples are unseen; cannot score {count}")


def is_single_word_task(completions: Sequence[str]) -> bool:
    """Whether every expected completion is one word (a classification-like task)."""
    return all(len(completion.split()) == 1 for completion in completions)


def normalize_whitespace(text: str) -> str:
    """`text` with leading and trailing whitespace removed and every whitespace run made one space."""
    return " ".join(text.split())


def answer_text(generated: str, first_word_only: bool) -> str:
    """The part of a generation (or of an expected completion) that `is_exact_match` compares."""
    if first_word_only:
        words = generated.split()
        return words[0].strip(string.punctuation) if words else ""
    return normalize_whitespace(generated.lstrip().split("\n", 1)[0])


def is_exact_match(generated: str, expected: str, first_word_only: bool) -> bool:
    """Whether a generated completion answers like `expected`, by the same rule for base and adapted.

    Classification-like tasks (`first_word_only`: every expected completion is one word): the
    first whitespace-separated word of the generation, with ASCII punctuation stripped from both
    ends, must equal the expected word exactly (case-sensitive); what follows it is ignored, so
    " positive." and " positive\\nReview: ..." both answer "positive".

    Other tasks: the generation, with leading whitespace dropped and cut at its first line break
    (no expected completion has one), must equal the expected completion once whitespace is
    normalized (runs made one space, ends stripped).

    A generation ends at the end-of-sequence token or after the task's token limit.
    """
    answer = answer_text(generated, first_word_only)
    return bool(answer) and answer == answer_text(expected, first_word_only)


def verdict_is_settled(generated: str, expected: str, first_word_only: bool) -> bool:
    """Whether no continuation of `generated` can change its `is_exact_match` verdict."""
    if first_word_only:
        stripped = generated.lstrip()
        if any(char.isspace() for char in stripped):
            return True
        core = stripped.lstrip(string.punctuation)
        target = answer_text(expected, True)
        can_match = target.startswith(core) or (
            core.startswith(target) and not core[len(target) :].strip(string.punctuation)
        )
        return not can_match
    stripped = generated.lstrip()
    if "\n" in stripped:
        return True
    return not answer_text(expected, False).startswith(normalize_whitespace(stripped))


@dataclass
class Generation:
    """One greedy generation being scored: a prompt through an adapter (None: the base model)."""

    adapter: str | None
    prompt_ids: list[int]
    expected: str
    draft_ids: list[int]
    max_new_tokens: int
    first_word_only: bool
    new_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False

    def accept(self, token: int, eos_token_id: int | None, decode: Callable[[list[int]], str]) -> None:
        """Take the next greedy token; finish at EOS, at the token limit or once the verdict is settled."""
        if token == eos_token_id:
            self.finished = True
            return
        self.new_ids.append(token)
        self.text = decode(self.new_ids)
        self.finished = len(self.new_ids) >= self.max_new_tokens or verdict_is_settled(
            self.text, self.expected, self.first_word_only
        )

    @property
    def correct(self) -> bool:
        """The generation's verdict (meaningful once finished)."""
        return is_exact_match(self.text, self.expected, self.first_word_only)


def greedy_tokens(loaded: LoadedBackbone, sequences: Sequence[tuple[list[int], str | None, int]]) -> list[list[int]]:
    """For each (token ids, adapter, n): the greedy next token after each of the last n prefixes.

    Sequences are packed into backbone calls of about `FORWARD_TOKEN_BUDGET` tokens, grouped by
    adapter (a layout needs a task's sequences adjacent); logits are computed for the n rows only.
    """
    device = next(loaded.model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: (sequences[i][1] is not None, sequences[i][1] or ""))
    results: list[list[int]] = [[] for _ in sequences]
    chunk: list[int] = []
    chunk_tokens = 0
    for position, index in enumerate(order):
        chunk.append(index)
        chunk_tokens += len(sequences[index][0])
        is_last = position == len(order) - 1
        if is_last or chunk_tokens + len(sequences[order[position + 1]][0]) > FORWARD_TOKEN_BUDGET:
            for chunk_index, tokens in zip(chunk, _forward_chunk(loaded, [sequences[i] for i in chunk], device)):
                results[chunk_index] = tokens
            chunk, chunk_tokens = [], 0
    return results


@torch.no_grad()
def _forward_chunk(
    loaded: LoadedBackbone, sequences: Sequence[tuple[list[int], str | None, int]], device: torch.device
) -> list[list[int]]:
    lengths = [len(ids) for ids, _, _ in sequences]
    adapters = [adapter for _, adapter, _ in sequences]
    input_ids = torch.tensor([token for ids, _, _ in sequences for token in ids], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(length, dtype=torch.long) for length in lengths]).to(device)
    hidden = loaded.model.hidden_states(input_ids, positions, MicroBatchLayout.for_sequences(lengths, adapters))
    rows, offset = [], 0
    for length, (_, _, count) in zip(lengths, sequences):
        rows.extend(range(offset + length - count, offset + length))
        offset += length
    counts = [count for _, _, count in sequences]
    logits = loaded.model.lm_head(hidden[rows], MicroBatchLayout.for_sequences(counts, adapters))
    tokens = logits.argmax(dim=-1).tolist()
    out, start = [], 0
    for count in counts:
        out.append(tokens[start : start + count])
        start += count
    return out


def run_generations(loaded: LoadedBackbone, generations: Sequence[Generation]) -> None:
    """Greedy-generate every generation until its verdict is settled (see the module docstring)."""
    tokenizer = loaded.tokenizer
    eos = tokenizer.eos_token_id
    drafts = [g.draft_ids[: g.max_new_tokens] for g in generations]
    verified = greedy_tokens(loaded, [(g.prompt_ids + d, g.adapter, len(d) + 1) for g, d in zip(generations, drafts)])
    for generation, draft, predictions in zip(generations, drafts, verified):
        for step, token in enumerate(predictions):
            generation.accept(token, eos, tokenizer.decode)
            if generation.finished or step == len(draft) or token != draft[step]:
                break
    active = [g for g in generations if not g.finished]
    while active:
        next_tokens = greedy_tokens(loaded, [(g.prompt_ids + g.new_ids, g.adapter, 1) for g in active])
        for generation, (token,) in zip(active, next_tokens):
            generation.accept(token, eos, tokenizer.decode)
        active = [g for g in active if not g.finished]


@dataclass(frozen=True)
class TaskAccuracy:
    """A task's held-out scores, and its first example's generations for display."""

    task: str
    total: int
    base_correct: int
    adapted_correct: int
    example: Example
    base_text: str
    adapted_text: str
    base_ok: bool
    adapted_ok: bool


@dataclass(frozen=True)
class HeldOutReport:
    """Every scored task's accuracy and how long the evaluation took."""

    tasks: list[TaskAccuracy]
    generations: int
    seconds: float


def task_generations(loaded: LoadedBackbone, examples: Sequence[Example], adapter: str | None) -> list[Generation]:
    """One generation per example through `adapter`, limited to the longest expected completion plus a few tokens."""
    tokenizer = loaded.tokenizer
    first_word_only = is_single_word_task([e["completion"] for e in examples])
    drafts = [tokenizer.encode(e["completion"], add_special_tokens=False) for e in examples]
    limit = max(len(draft) for draft in drafts) + EXTRA_NEW_TOKENS
    return [
        Generation(
            adapter=adapter,
            prompt_ids=tokenizer.encode(e["prompt"], add_special_tokens=True),
            expected=e["completion"],
            draft_ids=draft,
            max_new_tokens=limit,
            first_word_only=first_word_only,
        )
        for e, draft in zip(examples, drafts)
    ]


def evaluate_heldout(loaded: LoadedBackbone, examples: dict[str, list[Example]]) -> list[TaskAccuracy]:
    """Score each task's examples through the base model and through the task's adapter (attached to `loaded`)."""
    base = {task: task_generations(loaded, task_examples, None) for task, task_examples in examples.items()}
    adapted = {task: task_generations(loaded, task_examples, task) for task, task_examples in examples.items()}
    run_generations(loaded, [g for side in (base, adapted) for gens in side.values() for g in gens])
    return [
        TaskAccuracy(
            task=task,
            total=len(task_examples),
            base_correct=sum(g.correct for g in base[task]),
            adapted_correct=sum(g.correct for g in adapted[task]),
            example=task_examples[0],
            base_text=base[task][0].text,
            adapted_text=adapted[task][0].text,
            base_ok=base[task][0].correct,
            adapted_ok=adapted[task][0].correct,
        )
        for task, task_examples in examples.items()
    ]


def load_adapted_model(plan: Plan) -> LoadedBackbone:
    """The plan's backbone with every task's trained adapter (from its output folder) attached, in eval mode."""
    loaded = load_model(plan.job.model, plan.job.dtype)
    engine = MultiTaskEngine(loaded.model)
    for task in plan.tasks:
        _, state = load_adapter(Path(plan.job.output_dir) / task.name)
        engine.add_task(task_training(task), init_state=state)
    loaded.model.eval()
    return loaded


def heldout_sets(plan: Plan, count: int = DEFAULT_EXAMPLES) -> dict[str, list[Example]]:
    """`count` held-out examples for each of the plan's tasks, none with a prompt of its training file."""
    return {
        task.name: heldout_examples(task.name, count, training_prompts(Path(task.data.path))) for task in plan.tasks
    }


def evaluate_plan(plan: Plan, examples: dict[str, list[Example]]) -> HeldOutReport:
    """Held-out exact-match accuracy of a finished run's tasks on `examples` (see `heldout_sets`)."""
    start = time.perf_counter()
    results = evaluate_heldout(load_adapted_model(plan), examples)
    seconds = time.perf_counter() - start
    return HeldOutReport(results, generations=2 * sum(len(v) for v in examples.values()), seconds=seconds)


def accuracy_cell(correct: int, total: int) -> str:
    """`12/50 (24%)`."""
    return f"{correct}/{total} ({100 * correct / total:.0f}%)" if total else "-"


def format_accuracy_table(report: HeldOutReport, summary: dict) -> str:
    """The closing table: per task, training loss at start and end, then base and adapted accuracy."""
    rows = [("task", "loss start", "loss end", "base exact match", "adapted exact match")]
    for result in report.tasks:
        task = summary["tasks"].get(result.task, {})
        first, last = task.get("first_loss"), task.get("last_loss")
        rows.append(
            (
                result.task,
                f"{first:.4f}" if first is not None else "-",
                f"{last:.4f}" if last is not None else "-",
                accuracy_cell(result.base_correct, result.total),
                accuracy_cell(result.adapted_correct, result.total),
            )
        )
    count = report.tasks[0].total if report.tasks else 0
    lines = [f"held-out exact match, {count} unseen examples per task (one-word answers: the first word counts):"]
    lines += aligned_columns(rows)
    lines.append(f"evaluation: {report.generations} greedy answers in {report.seconds:.1f} s")
    return "\n".join(lines)


def format_examples(report: HeldOutReport) -> str:
    """One held-out example per task: its prompt's tail, the expected answer, base and adapted generations."""
    blocks = []
    for result in report.tasks:
        prompt = result.example["prompt"]
        tail = " / ".join(line.strip()[-70:] for line in prompt.splitlines()[-2:])
        blocks.append(
            "\n".join(
                [
                    f"[{result.task}] ...{tail}",
                    f"  expected: {result.example['completion'].strip()[:80]}",
                    f"  base:     {result.base_text.strip()[:80]!r} ({'right' if result.base_ok else 'wrong'})",
                    f"  adapted:  {result.adapted_text.strip()[:80]!r} ({'right' if result.adapted_ok else 'wrong'})",
                ]
            )
        )
    return "\n\n".join(blocks)
