"""The one base of every user-input error: a list of problems, one per line."""

from __future__ import annotations

from collections.abc import Iterable


class UserError(ValueError):
    """Bad user input (a spec, plan, data file, model or checkpoint): every problem found, one
    per line, each naming its field or file. Command lines print it and exit with status 2."""

    def __init__(self, errors: Iterable[str] | str) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))
