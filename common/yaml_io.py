"""Reading YAML from users safely: bounded size, depth and alias expansion; duplicate keys
refused.

PyYAML's `safe_load` never runs code, but it happily builds a "billion laughs" document (a
kilobyte of nested aliases that stands for 10^9 values) and resolves a repeated key to its last
value. `read_yaml_file` composes the node graph first, checks it, and only then builds Python
values; every problem is one message naming the file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import UserError

MAX_DEPTH = 64
"""Deepest nesting of mappings and lists a document may have."""

MAX_ALIAS_EXPANSION = 100_000
"""How many values aliases may add to a document beyond those written out."""

DEFAULT_MAX_BYTES = 16 * 2**20


class YamlInputError(UserError):
    """A YAML file that cannot be read safely; the message names the file and line."""


def _where(file: Path | str, mark: Any) -> str:
    return f"{file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(file)


class _CheckedLoader(yaml.SafeLoader):
    """A safe loader that bounds nesting while composing and refuses duplicate keys."""

    def __init__(self, stream: str, file: Path | str) -> None:
        super().__init__(stream)
        self.file = file
        self.depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlInputError(f"{_where(self.file, mark)}: nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except YamlInputError:
            raise
        except (ValueError, OverflowError) as exc:
            reason = str(exc).split(";")[0]
            raise YamlInputError(f"{_where(self.file, node.start_mark)}: unreadable value: {reason}") from None

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise YamlInputError(
                        f"{self.file}:{line}: duplicate key {_short(key)} (first on line {seen[key]}); "
                        "a key may appear once in a mapping"
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_CheckedLoader.add_constructor("tag:yaml.org,2002:map", _CheckedLoader.construct_yaml_map)


def _short(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 60 else text[:60] + "..."


def _check_expansion(root: Node, file: Path | str) -> None:
    """Refuse a document whose aliases stand for more than `MAX_ALIAS_EXPANSION` extra values.

    The expanded size of each distinct node is computed once (memoized), so even an
    exponentially large expansion is measured in time linear in the written document."""
    sizes: dict[int, int] = {}

    def size(node: Node) -> int:
        key = id(node)
        if key not in sizes:
            if isinstance(node, SequenceNode):
                sizes[key] = 1 + sum(size(child) for child in node.value)
            elif isinstance(node, MappingNode):
                sizes[key] = 1 + sum(size(k) + size(v) for k, v in node.value)
            else:
                sizes[key] = 1
        return sizes[key]

    expanded = size(root)
    if expanded - len(sizes) > MAX_ALIAS_EXPANSION:
        raise YamlInputError(
            f"{_where(file, root.start_mark)}: YAML aliases expand this document to about {expanded:.3g} values "
            f"from {len(sizes)} written ones (at most {MAX_ALIAS_EXPANSION} more are allowed); "
            "write the repeated values out instead of aliasing them"
        )


def parse_yaml_text(text: str, file: Path | str) -> Any:
    """The value of one YAML document, checked as the module docstring says (None if empty)."""
    loader = _CheckedLoader(text, file)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, file)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise YamlInputError(f"{_where(file, mark)}: invalid YAML: {problem}") from None
    except RecursionError:
        raise YamlInputError(f"{file}: nested too deeply to read") from None
    finally:
        loader.dispose()


def read_yaml_file(path: Path | str, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Read and parse a YAML file of at most ``max_bytes`` bytes.

    Raises `YamlInputError` (a missing or unreadable file, a folder, bad UTF-8, invalid YAML,
    too deep, too many aliases, duplicate keys) and never returns a partial value."""
    file = Path(path)
    try:
        with open(file, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise YamlInputError(f"{file}: file not found") from None
    except IsADirectoryError:
        raise YamlInputError(f"{file}: is a directory, not a file") from None
    except OSError as exc:
        raise YamlInputError(f"{file}: cannot read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise YamlInputError(f"{file}: larger than {max_bytes // 2**20} MiB; this is not a spec or plan file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise YamlInputError(f"{file}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x})") from None
    return parse_yaml_text(text, file)
