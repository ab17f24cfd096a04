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


def corrupted(data: Any, path: tuple[Any, ...], junk: Any, delete: bool) -> Any:
    """`data` with the node at `path` replaced by `junk` (or deleted), in place; returns it."""
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = junk
    return data
