"""Short, bounded wording shared by the plan checks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from muxtune.common.text import quote
from muxtune.specs.checks import did_you_mean

from .instructions import AllReduce, Backward, Forward, Free, Instruction, LoadBatches, LossBackward, Recv, Send

LISTED = 8
"""Items a message lists before it only counts the rest."""


def listing(items: Iterable[Any], limit: int = LISTED) -> str:
    """``1, 2, 3`` (values quoted when strings), cut after ``limit`` items with the total."""
    items = list(items)
    shown = ", ".join(quote(item) if isinstance(item, str) else str(item) for item in items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"


def missing_numbers(count: int, present: Callable[[int], bool], num_present: int) -> str:
    """The numbers ``0..count-1`` for which ``present`` is false, listed like `listing`, given
    that ``num_present`` of them are present; the work does not grow with ``count``."""
    shown = []
    for number in range(count):
        if len(shown) == LISTED:
            break
        if not present(number):
            shown.append(number)
    total = count - num_present
    text = ", ".join(str(number) for number in shown)
    return text if total <= LISTED else f"{text}, ... ({total} in all)"


def unknown_task(name: str, tasks: Iterable[str]) -> str:
    """``unknown task 'c_2' (did you mean 'c-2'?)``."""
    return f"unknown task {quote(name)}{did_you_mean(name, list(tasks))}"


def describe(instruction: Instruction) -> str:
    """What an instruction does, for messages: ``forward of subgraph 1 (hTask 0, micro-batch 2)``."""
    if isinstance(instruction, LoadBatches):
        return f"load_batches of hTask {instruction.htask}"
    if isinstance(instruction, AllReduce):
        return f"all_reduce of tasks {quote(list(instruction.tasks))} over ranks {listing(instruction.group)}"
    if not isinstance(instruction, (Forward, Backward, LossBackward, Free, Send, Recv)):
        return instruction.op.value
    where = f"(hTask {instruction.htask}, micro-batch {instruction.microbatch})"
    if isinstance(instruction, (Forward, Backward)):
        return f"{instruction.op.value} of subgraph {instruction.subgraph} {where}"
    if isinstance(instruction, LossBackward):
        return f"loss_backward {where}"
    if isinstance(instruction, Free):
        return f"free {where}"
    if isinstance(instruction, (Send, Recv)):
        what = "gradient" if instruction.grad else "activation"
        direction = "to" if isinstance(instruction, Send) else "from"
        return (
            f"{instruction.op.value} of the {what} after subgraph {instruction.subgraph} {where} "
            f"{direction} rank {instruction.peer}"
        )
    return instruction.op.value
