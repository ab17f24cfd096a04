"""Text for people: bounded descriptions of user values for error messages, and fixed-width
tables for command output.

A message never quotes a whole value: a hostile spec can hold megabytes in one string or an
exponentially large structure. `quote` shows a short prefix plus the value's type and size.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

QUOTE_LIMIT = 60
"""Characters of a value's repr that a message shows at most."""

_MAX_INT_DIGITS = 30


def _size(value: Any) -> str:
    if isinstance(value, (str, bytes)):
        return f"{type(value).__name__} of {len(value)} characters"
    if isinstance(value, (list, tuple, dict, set)):
        return f"{type(value).__name__} of {len(value)} item{'s' if len(value) != 1 else ''}"
    return type(value).__name__


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` when it is short, else its first ``limit`` characters, ``...`` and the
    value's type and size (``'aaaa...' (str of 1000000 characters)``). Never builds the
    whole repr of a large container, and never converts a huge integer to decimal."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3.33 * _MAX_INT_DIGITS:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    if isinstance(value, (list, tuple, dict, set)) and len(value) > limit:
        return f"a {_size(value)}"
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({_size(value)})"
    text = _bounded_repr(value, limit)
    if text is None:
        return f"a {_size(value)}"
    return text


def _bounded_repr(value: Any, limit: int) -> str | None:
    """repr of small values; None when the repr would exceed ``limit`` characters (checked
    while building it, so a deeply nested or aliased structure costs at most ``limit`` work)."""
    parts: list[str] = []
    budget = [limit * 4]

    def emit(text: str) -> bool:
        parts.append(text)
        budget[0] -= len(text)
        return budget[0] >= 0

    def walk(item: Any, depth: int) -> bool:
        if depth > 8:
            return False
        if isinstance(item, dict):
            if not emit("{"):
                return False
            for i, (key, sub) in enumerate(item.items()):
                if (i and not emit(", ")) or not walk(key, depth + 1) or not emit(": ") or not walk(sub, depth + 1):
                    return False
            return emit("}")
        if isinstance(item, (list, tuple)):
            opening, closing = ("[", "]") if isinstance(item, list) else ("(", ")")
            if not emit(opening):
                return False
            for i, sub in enumerate(item):
                if (i and not emit(", ")) or not walk(sub, depth + 1):
                    return False
            return emit(closing)
        if isinstance(item, (str, bytes)) and len(item) > limit:
            return False
        if isinstance(item, int) and not isinstance(item, bool) and item.bit_length() > 3.33 * _MAX_INT_DIGITS:
            return False
        return emit(repr(item))

    if not walk(value, 0):
        return None
    text = "".join(parts)
    if len(text) > limit:
        return text[:limit] + f"... ({_size(value)})"
    return text


def clip_line(line: str, limit: int = 500) -> str:
    """``line`` cut to ``limit`` characters, saying how much was left out."""
    if len(line) <= limit:
        return line
    return f"{line[:limit]}... ({len(line) - limit} more characters)"


def aligned_columns(rows: Sequence[Sequence[str]], right: Collection[int] = (), rule: bool = False) -> list[str]:
    """Rows of cells as lines of fixed-width columns two spaces apart (each as wide as its widest
    cell; the columns indexed in ``right`` right-aligned), trailing spaces dropped; ``rule`` puts
    a line of dashes under the first row (the header)."""
    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    lines = list(rows)
    if rule:
        lines.insert(1, ["-" * w for w in widths])
    return [
        "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in lines
    ]
