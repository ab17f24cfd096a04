"""The one exception type for bad user input in a job spec."""

from __future__ import annotations

from collections.abc import Iterable


class SpecError(ValueError):
    """Every problem found in a job spec, one per line, each prefixed with its field path."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors: list[str] = list(errors)
        super().__init__("\n".join(self.errors))
