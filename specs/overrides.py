"""``key=value`` overrides applied to a raw job spec before validation.

Keys are dotted paths (``cluster.device=cpu``); list items are addressed by index
(``tasks.0.lr=1e-4``), by their ``name`` (``tasks.sentiment.lr=1e-4``) or all at once
(``tasks.*.steps=2``). Values are parsed as YAML, and numbers YAML 1.1 leaves as strings
(``1e-4``) become floats.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from muxtune.common.text import quote
from muxtune.common.yaml_io import YamlInputError, parse_yaml_text

from .checks import Invalid, looks_numeric


def parse_override_value(text: str) -> Any:
    """The YAML value of ``text``; ``1e-4`` and friends become floats."""
    try:
        value = parse_yaml_text(text, "value")
    except YamlInputError as exc:
        problem = str(exc).split(": ", 1)[-1]
        if problem.startswith("invalid YAML: "):
            raise Invalid(f"value is not valid YAML: {problem.removeprefix('invalid YAML: ')}") from None
        raise Invalid(f"value: {problem}") from None
    if isinstance(value, str) and looks_numeric(value):
        return float(value)
    return value


def _children(container: Any, segment: str, path: str, create: bool) -> list[tuple[Any, Any]]:
    """(container, key) pairs that ``segment`` addresses inside ``container``."""
    if isinstance(container, dict):
        if create and segment not in container:
            container[segment] = {}
        return [(container, segment)]
    if isinstance(container, list):
        if segment == "*":
            return [(container, i) for i in range(len(container))]
        if segment.isdigit():
            index = int(segment)
            if index >= len(container):
                raise Invalid(f"index {index} out of range ({path} has {len(container)} items)")
            return [(container, index)]
        names = [item.get("name") for item in container if isinstance(item, dict)]
        for index, item in enumerate(container):
            if isinstance(item, dict) and item.get("name") == segment:
                return [(container, index)]
        known = ", ".join(str(n) for n in names if n is not None) or "none"
        raise Invalid(f"no task named {quote(segment)} in {path} (names: {known})")
    raise Invalid(f"{path} is not a mapping or list, cannot set {quote(segment)} in it")


def _apply_one(root: Any, item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise Invalid("expected key=value")
    segments = key.split(".")
    if any(not s for s in segments):
        raise Invalid(f"malformed key {quote(key)}")
    value = parse_override_value(text)
    targets: list[tuple[Any, Any]] = [({"": root}, "")]
    path_parts: list[str] = []
    for depth, segment in enumerate(segments):
        last = depth == len(segments) - 1
        path = ".".join(path_parts) or "the job spec"
        next_targets: list[tuple[Any, Any]] = []
        for parent, k in targets:
            next_targets.extend(_children(parent[k], segment, path, create=not last))
        targets = next_targets
        path_parts.append(segment)
    for parent, k in targets:
        parent[k] = copy.deepcopy(value)


def apply_overrides(raw: Any, overrides: Sequence[str], errors: list[str]) -> Any:
    """A copy of ``raw`` with ``overrides`` applied; problems go to ``errors`` by override."""
    result = copy.deepcopy(raw) if raw is not None else {}
    for item in overrides:
        try:
            _apply_one(result, item)
        except Invalid as exc:
            errors.append(f"override {quote(item)}: {exc}")
    return result
