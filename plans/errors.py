"""The one exception type for an invalid plan."""

from __future__ import annotations

from collections.abc import Iterable


class PlanError(ValueError):
    """Every problem found in a plan, one per line, each prefixed with its field path."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors: list[str] = list(errors)
        super().__init__("\n".join(self.errors))
