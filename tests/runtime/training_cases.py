"""Shared pieces of the fidelity tests: random batches, MuxTune training of one or several tasks
from given initial states, the transformers + peft reference loop, and the update comparison."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from muxtune.runtime.backbone import load_model
from muxtune.runtime.data import Example
from muxtune.runtime.engine import MultiTaskEngine, TaskTraining
from muxtune.tools.hf_batches import padded_batch, padded_batch_loss


@dataclass(frozen=True)
class TaskCase:
    """A task's training configuration and the shape of its random batches."""

    training: TaskTraining
    batch_size: int
    min_len: int
    max_len: int


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


def train_muxtune(
    model_dir: Path,
    cases: tuple[TaskCase, ...],
    init: dict[str, dict[str, torch.Tensor]],
    batches: dict[str, list[list[Example]]],
    max_tokens: int,
    encode: Callable[[str], list[int]] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Train `cases` together (fused rounds) from the initial states `init` (by task, keyed
    `<anchor>.<param>`; a task missing there starts from its seeded initialization) and return
    each task's final adapter state."""
    loaded = load_model(str(model_dir))
    engine = MultiTaskEngine(loaded.model, encode=encode)
    for case in cases:
        engine.add_task(case.training, init_state=init.get(case.training.name))
    for round_index in range(max(c.training.steps for c in cases)):
        round_batches = {
            c.training.name: batches[c.training.name][round_index] for c in cases if round_index < c.training.steps
        }
        for result in engine.train_round(round_batches, {name: max_tokens for name in round_batches}):
            assert not result.diverged and math.isfinite(result.loss)
    return {name: state.adapter_state() for name, state in engine.tasks.items()}


def relative_update_difference(final: dict, reference: dict, init: dict) -> float:
    """||final - reference|| / ||reference - init|| over all tensors of `init`."""
    num = sum(float((final[k] - reference[k]).norm() ** 2) for k in init)
    den = sum(float((reference[k] - init[k]).norm() ** 2) for k in init)
    return math.sqrt(num / den)


def train_peft_model(model: torch.nn.Module, training: TaskTraining, batches: list[list[Example]]) -> None:
    """The reference loop: a transformers + peft model (trainable parameters: the adapter's)
    trained on right-padded batches with DESIGN section 8's loss, optimizer and schedule."""
    import transformers

    params = [p for p in model.parameters() if p.requires_grad]
    cfg = training
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


def peft_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A peft model's trainable tensors keyed like MuxTune's operator-level states."""
    prefix = "base_model.model."
    return {
        name[len(prefix) :].replace(".default.", ".") if name.startswith(prefix) else name: p.detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def train_transformers_peft(model_dir: Path, case: TaskCase, adapter_dir: Path, batches: list[list[Example]]) -> dict:
    """Reference: the task alone in transformers + peft, started from the adapter directory."""
    import transformers
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    train_peft_model(model, case.training, batches)
    return peft_trainable_state(model)
