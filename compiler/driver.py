"""The pass driver: runs the compiler's passes in order and, when one fails on something other
than bad user input, says which pass failed and which one ran before it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from muxtune.common.errors import UserError

T = TypeVar("T")


class CompilerPassError(RuntimeError):
    """A pass broke an invariant (a compiler bug, not bad input); names the pass and its predecessor."""


class PassDriver:
    """Runs named passes, remembering which have completed."""

    def __init__(self) -> None:
        self.completed: list[str] = []

    def run(self, name: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` as pass ``name``; user errors pass through unchanged."""
        try:
            result = function(*args, **kwargs)
        except UserError:
            raise
        except Exception as exc:
            before = f"after pass '{self.completed[-1]}'" if self.completed else "as the first pass"
            raise CompilerPassError(f"compiler pass '{name}' failed {before}: {type(exc).__name__}: {exc}") from exc
        self.completed.append(name)
        return result
