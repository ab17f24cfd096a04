"""Compile errors: every problem found, each naming its field or file."""

from __future__ import annotations


class CompileError(ValueError):
    """The job cannot be compiled; `errors` lists every problem, one per line in str()."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))
