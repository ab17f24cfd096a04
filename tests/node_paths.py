"""Every node of a nested dict/list, for tests that corrupt one node at a time."""

from __future__ import annotations

from typing import Any


def node_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Key/index paths of every node below `value` (depth first)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += node_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += node_paths(item, (*prefix, index))
    return out
