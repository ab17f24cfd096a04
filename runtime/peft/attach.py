"""Attaching and detaching a task's PEFT modules through the method registry."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from muxtune.specs import PeftSpec

from .base import PeftHost
from .registry import AttachContext, method_of


def is_anchorable(module: nn.Module) -> bool:
    """True for the backbone modules PEFT modules attach to: PEFT hosts."""
    return isinstance(module, PeftHost)


def attach_task(
    model: nn.Module,
    task: str,
    spec: PeftSpec,
    *,
    seed: int,
    dropout_generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    encode: Callable[[str], list[int]] | None = None,
) -> dict[str, nn.Module]:
    """Attach `task`'s modules of its method; returns them by anchor name.

    Initialization is drawn from a generator seeded with the task seed, anchor by anchor in
    model order, so it depends on nothing but the task itself; dropout masks come from the
    task's own `dropout_generator`. `encode` is the job's tokenizer (for text initializations).
    Raises `PeftAttachError` when the config does not fit the model.
    """
    generator = torch.Generator().manual_seed(seed)
    ctx = AttachContext(model, task, generator, dropout_generator, dtype, encode)
    return method_of(spec).attach(spec, ctx)


def detach_task(model: nn.Module, task: str) -> None:
    """Remove `task`'s modules from every host (the others' modules stay)."""
    for module in model.modules():
        if isinstance(module, PeftHost):
            module.remove_adapter(task)
