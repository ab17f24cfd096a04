"""Learning-rate schedules with transformers' definitions (multipliers of the base LR)."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(name: str, step: int, warmup_steps: int, total_steps: int) -> float:
    """The LR factor for 0-based optimizer step `step`.

    Equal to transformers' get_constant_schedule_with_warmup, get_linear_schedule_with_warmup
    and get_cosine_schedule_with_warmup (num_cycles 0.5) over `total_steps`.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if name == "constant":
        return 1.0
    if name == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    if name == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * 0.5 * progress)))
    raise ValueError(f"unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
