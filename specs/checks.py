"""Field checkers shared by spec and plan validation.

A checker takes a raw value (from YAML) and returns the converted value or raises `Invalid`
with a message that does not yet name the field. `MappingReader` reads one mapping, records
every problem as ``"<field path>: <message>"`` and never stops at the first one.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from muxtune.common.text import quote

Checker = Callable[[Any], Any]

_NUMBER_RE = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_EXACT_FLOAT_INT = 2**53
_MAX_NUMBER_TEXT = 400
_MAX_SUGGESTED_LENGTH = 200

MAX_INT = 2**63 - 1
"""No integer field holds more than a signed 64-bit value (torch seeds, counters, file sizes)."""


class Invalid(Exception):
    """Raised by a checker; the message says what is wrong, without the field path."""


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


class _InvalidValue:
    def __repr__(self) -> str:
        return "INVALID"


MISSING: Any = _Missing()
"""Marks a field with no default: leaving it out is an error."""

INVALID: Any = _InvalidValue()
"""Stands in for a value that failed its check (its error is already recorded)."""


def join(path: str, key: str) -> str:
    """Field path of ``key`` inside the mapping at ``path``."""
    return f"{path}.{key}" if path else key


def at(path: str, index: int) -> str:
    """Field path of item ``index`` of the list at ``path``."""
    return f"{path}[{index}]"


def add_error(errors: list[str], path: str, message: str) -> None:
    """Record ``message`` for the field at ``path``."""
    errors.append(f"{path}: {message}" if path else message)


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string (also for words
    too long to be a misspelling, which would make the comparison slow)."""
    if len(word) > _MAX_SUGGESTED_LENGTH:
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {quote(close[0])}?)" if close else ""


def looks_numeric(value: str) -> bool:
    """True for strings YAML 1.1 leaves unparsed but that are plain numbers (``1e-4``)."""
    return bool(_NUMBER_RE.match(value.strip()))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_number(value: Any) -> float | int | None:
    """The number ``value`` stands for; an int too large for a float becomes ``inf``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if abs(value) <= _EXACT_FLOAT_INT:
            return value
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, float):
        return value
    if isinstance(value, str) and len(value) <= _MAX_NUMBER_TEXT and looks_numeric(value):
        return float(value)
    return None


def as_is(value: Any) -> Any:
    """Any value, unchecked (the caller checks it, or it is a nested mapping)."""
    return value


def int_in_range(low: int, high: int, what: str = "") -> Checker:
    """An integer in ``[low, high]``; ``what`` says what the bound protects (shown past ``high``)."""

    def check(value: Any) -> int:
        if not _is_int(value) or value < low:
            kind = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")
            raise Invalid(f"must be {kind}, got {quote(value)}")
        if value > high:
            raise Invalid(f"must be at most {high}{' ' + what if what else ''}, got {quote(value)}")
        return value

    return check


positive_int = int_in_range(1, MAX_INT)
non_negative_int = int_in_range(0, MAX_INT)


def integer(value: Any) -> int:
    if not _is_int(value):
        raise Invalid(f"must be an integer, got {quote(value)}")
    if abs(value) > MAX_INT:
        raise Invalid(f"must be at most {MAX_INT} in size, got {quote(value)}")
    return value


def positive_number(value: Any) -> float:
    number = _as_number(value)
    if number is None or not math.isfinite(number) or number <= 0:
        raise Invalid(f"must be a positive number, got {quote(value)}")
    return float(number)


def non_negative_number(value: Any) -> float:
    number = _as_number(value)
    if number is None or not math.isfinite(number) or number < 0:
        raise Invalid(f"must be a non-negative number, got {quote(value)}")
    return float(number)


def positive_number_keep_int(value: Any) -> int | float:
    """Like `positive_number`, but an int stays an int (LoRA alpha is usually written as one)."""
    if _is_int(value) and 0 < value <= _EXACT_FLOAT_INT:
        return value
    return positive_number(value)


def unit_interval(value: Any) -> float:
    """A number in [0, 1)."""
    number = _as_number(value)
    if number is None or not 0 <= number < 1:
        raise Invalid(f"must be a number in [0, 1), got {quote(value)}")
    return float(number)


def non_empty_str(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"must be a non-empty string, got {quote(value)}")
    return value


def optional(checker: Checker) -> Checker:
    """Accept None (YAML ``null``) as well as what ``checker`` accepts."""

    def check(value: Any) -> Any:
        return None if value is None else checker(value)

    return check


def one_of(*choices: str, what: str = "") -> Checker:
    """A string from ``choices``; ``what`` names the kind in the message."""

    def check(value: Any) -> str:
        if isinstance(value, str) and value in choices:
            return value
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        if what:
            raise Invalid(f"unsupported {what} {quote(value)} (supported: {', '.join(choices)}){hint}")
        listed = ", ".join(repr(c) for c in choices)
        raise Invalid(f"must be one of {listed}, got {quote(value)}{hint}")

    return check


def auto_or(checker: Checker) -> Checker:
    """The string ``auto`` or what ``checker`` accepts."""

    def check(value: Any) -> Any:
        if value == "auto":
            return "auto"
        try:
            return checker(value)
        except Invalid as exc:
            raise Invalid(f"must be 'auto' or {str(exc).removeprefix('must be ')}") from None

    return check


def matches(pattern: str, description: str) -> Checker:
    """A string fully matching ``pattern``; ``description`` is shown on failure."""
    compiled = re.compile(pattern)

    def check(value: Any) -> str:
        if not isinstance(value, str) or not compiled.fullmatch(value):
            raise Invalid(f"must match {description}, got {quote(value)}")
        return value

    return check


def identifier_list(value: Any) -> tuple[str, ...]:
    """A non-empty list of identifier-like strings (``q_proj``, ``mlp.down_proj``)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise Invalid(f"must be a non-empty list of module names, got {quote(value)}")
    bad = [v for v in value if not isinstance(v, str) or not _IDENTIFIER_RE.match(v)]
    if bad:
        raise Invalid(f"must contain identifier-like module names, got {quote(bad[0])}")
    if len(set(value)) != len(value):
        raise Invalid(f"must not repeat a module name, got {quote(list(value))}")
    return tuple(value)


class MappingReader:
    """Reads the fields of one raw mapping, recording every error under its field path.

    Construct it with the keys the mapping may hold; unknown keys are reported with a
    did-you-mean. `get` returns the checked value, the default, or `INVALID`. A raw value
    that is itself `INVALID` (its error already recorded) reads as an empty, failed mapping.
    """

    def __init__(
        self,
        raw: Any,
        path: str,
        errors: list[str],
        known: Sequence[str],
        what: str = "mapping",
    ) -> None:
        self.path = path
        self.errors = errors
        self.ok = isinstance(raw, Mapping)
        self.raw: Mapping[Any, Any] = raw if self.ok else {}
        if not self.ok:
            if raw is not INVALID:
                add_error(errors, path, f"must be a {what}, got {quote(raw)}")
            return
        for key in raw:
            if not isinstance(key, str) or key not in known:
                hint = did_you_mean(key, known) if isinstance(key, str) else ""
                add_error(errors, join(path, str(key)), f"unknown key{hint}")

    def has(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str, checker: Checker, default: Any = MISSING) -> Any:
        """The checked value of ``key``; `INVALID` (error recorded) when missing or wrong."""
        if not self.ok:
            return INVALID
        field_path = join(self.path, key)
        if key not in self.raw:
            if default is MISSING:
                add_error(self.errors, field_path, "missing required key")
                return INVALID
            return default
        try:
            return checker(self.raw[key])
        except Invalid as exc:
            add_error(self.errors, field_path, str(exc))
            return INVALID


def check_json_like(value: Any, path: str, errors: list[str]) -> None:
    """Record an error for every part of ``value`` that JSON (and so YAML written for other
    tools) cannot hold: non-string keys, non-finite floats, other types."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                add_error(errors, path, f"keys must be strings, got {quote(key)}")
            else:
                check_json_like(item, join(path, key), errors)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_json_like(item, at(path, index), errors)
    elif isinstance(value, float) and not math.isfinite(value):
        add_error(errors, path, f"must be a finite number, got {quote(value)}")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        add_error(
            errors,
            path,
            f"must be JSON-like (mapping, list, string, number, bool, null), got {type(value).__name__}",
        )
