"""Plan files: deterministic YAML, atomic writes, validated reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from muxtune.common.files import atomic_write_text
from muxtune.common.yaml_io import YamlInputError, read_yaml_file

from .errors import PlanError
from .schema import Plan
from .serialize import plan_from_dict, plan_to_dict, validate_plan

MAX_PLAN_BYTES = 256 * 2**20
"""Largest plan file read (a plan lists every instruction of every rank)."""

_SCALARS = (str, int, float, bool, type(None))


class _PlanDumper(yaml.SafeDumper):
    """Block style, except instructions, each on one line however long, and lists of scalars
    (flow style, wrapped at the width)."""

    _one_line = False

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def expect_flow_mapping(self) -> None:
        if not self.flow_level:
            self._one_line = True
        super().expect_flow_mapping()

    def expect_flow_sequence(self) -> None:
        if not self.flow_level:
            self._one_line = False
        super().expect_flow_sequence()

    def write_indent(self) -> None:
        if not (self.flow_level and self._one_line):
            super().write_indent()


class _FlowDict(dict):
    """A mapping written in flow style (``{op: load_batches, htask: 0}``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(isinstance(item, _SCALARS) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_flow_dict(dumper: yaml.SafeDumper, data: _FlowDict) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=True)


_PlanDumper.add_representer(list, _represent_list)
_PlanDumper.add_representer(_FlowDict, _represent_flow_dict)


def dump_plan(plan: Plan) -> str:
    """The plan file's text (validates first). The same plan always gives the same text."""
    data = plan_to_dict(validate_plan(plan))
    for program in data["programs"]:
        program["prologue"] = [_FlowDict(i) for i in program["prologue"]]
        program["phases"] = [[_FlowDict(i) for i in body] for body in program["phases"]]
        program["epilogue"] = [_FlowDict(i) for i in program["epilogue"]]
    return yaml.dump(
        data,
        Dumper=_PlanDumper,
        sort_keys=False,
        allow_unicode=False,
        width=100,
        default_flow_style=False,
    )


def save_plan(plan: Plan, path: Path | str) -> Path:
    """Validate and write ``plan`` atomically (temp file in the same folder + os.replace)."""
    return atomic_write_text(path, dump_plan(plan))


def load_plan(path: Path | str) -> Plan:
    """Read and fully validate a plan file (version, fields, references, fingerprint)."""
    try:
        raw = read_yaml_file(path, max_bytes=MAX_PLAN_BYTES)
    except YamlInputError as exc:
        raise PlanError([str(exc)]) from None
    if raw is None:
        raise PlanError([f"{path}: the plan file is empty"])
    return plan_from_dict(raw)
