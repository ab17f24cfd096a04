"""Plan <-> plain data, with full validation on the way in.

`plan_from_dict` checks the schema version first (a plan of another version is not read any
further), then every field, the cross references and finally the fingerprint. All errors
are collected and raised as one `PlanError`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from muxtune.common.text import quote
from muxtune.specs import DTYPES
from muxtune.specs.checks import (
    INVALID,
    Invalid,
    MappingReader,
    add_error,
    as_is,
    at,
    did_you_mean,
    integer,
    join,
    non_empty_str,
    non_negative_int,
    non_negative_number,
    one_of,
    optional,
    positive_int,
)
from muxtune.specs.parse import (
    check_task_names,
    model_checker,
    path_checker,
    read_task,
    task_name,
    to_plain,
)

from .errors import PlanError
from .fingerprint import compute_fingerprint
from .instructions import INSTRUCTION_TYPES, Instruction, Opcode, instruction_to_dict, payload_fields
from .references import check_references
from .schema import (
    PACK_ORDERS,
    SCHEMA_VERSION,
    Alignment,
    ClusterPlan,
    HTask,
    JobSummary,
    Plan,
    Predictions,
    RankProgram,
    TaskPlan,
)

_PLAN_KEYS = tuple(f.name for f in dataclasses.fields(Plan))
_STAT_KEYS = ("num_examples", "num_targetless_examples", "num_tokens")
_SECTIONS = ("prologue", "round", "epilogue")
_OPS = tuple(op.value for op in Opcode)
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def _keys(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """Plain data in the file's key order (``schema_version`` first); tuples become lists."""
    out: dict[str, Any] = {}
    for name in _PLAN_KEYS:
        value = getattr(plan, name)
        if name == "programs":
            out[name] = [
                {
                    "rank": p.rank,
                    "device": p.device,
                    **{s: [instruction_to_dict(i) for i in getattr(p, s)] for s in _SECTIONS},
                }
                for p in value
            ]
        elif name == "backbone":
            out[name] = copy.deepcopy(value)
        else:
            out[name] = to_plain(value)
    return out


def _check_json_like(value: Any, path: str, errors: list[str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                add_error(errors, path, f"keys must be strings, got {quote(key)}")
            else:
                _check_json_like(item, join(path, key), errors)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_like(item, at(path, index), errors)
    elif isinstance(value, float) and not math.isfinite(value):
        add_error(errors, path, f"must be a finite number, got {quote(value)}")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        add_error(
            errors,
            path,
            f"must be JSON-like (mapping, list, string, number, bool, null), got {type(value).__name__}",
        )


def _name_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise Invalid(f"must be a non-empty list of task names, got {quote(value)}")
    for item in value:
        task_name(item)
    if len(set(value)) != len(value):
        raise Invalid(f"must not repeat a task name, got {quote(value)}")
    return tuple(value)


def _budget_list(value: Any) -> tuple[int, ...]:
    def ok(item: Any) -> bool:
        return isinstance(item, int) and not isinstance(item, bool) and item > 0

    if not isinstance(value, list) or not value or not all(ok(item) for item in value):
        raise Invalid(f"must be a non-empty list of positive integers, got {quote(value)}")
    return tuple(value)


_PAYLOAD_CHECKERS = {int: non_negative_int, tuple[str, ...]: _name_list}


def _read_instruction(raw: Any, path: str, errors: list[str]) -> Instruction | Any:
    if not isinstance(raw, Mapping) or "op" not in raw:
        add_error(errors, path, f"must be a mapping with an 'op' key, got {quote(raw)}")
        return INVALID
    op = raw["op"]
    if op not in _OPS:
        hint = did_you_mean(op, _OPS) if isinstance(op, str) else ""
        add_error(errors, path, f"unknown op {quote(op)}{hint}")
        return INVALID
    cls = INSTRUCTION_TYPES[Opcode(op)]
    fields = payload_fields(cls)
    before = len(errors)
    reader = MappingReader(raw, path, errors, ("op", *fields))
    values = {name: reader.get(name, _PAYLOAD_CHECKERS[hint]) for name, hint in fields.items()}
    if len(errors) > before:
        errors[before:] = [f"{e} (op {op})" for e in errors[before:]]
        return INVALID
    return cls(**values)


def _read_program(raw: Any, path: str, errors: list[str]) -> RankProgram:
    r = MappingReader(raw, path, errors, _keys(RankProgram), "rank program mapping")
    sections: dict[str, Any] = {}
    for section in _SECTIONS:
        items = r.get(section, as_is)
        if items is INVALID:
            sections[section] = INVALID
        elif not isinstance(items, list):
            add_error(errors, join(path, section), f"must be a list of instructions, got {quote(items)}")
            sections[section] = INVALID
        else:
            sections[section] = tuple(
                _read_instruction(item, at(join(path, section), i), errors) for i, item in enumerate(items)
            )
    return RankProgram(rank=r.get("rank", non_negative_int), device=r.get("device", non_empty_str), **sections)


def _read_task(raw: Any, path: str, errors: list[str]) -> TaskPlan:
    spec, reader = read_task(
        raw, path, errors, base_dir=None, check_paths=False, require_all=True, extra_keys=_STAT_KEYS
    )
    stats = {key: reader.get(key, non_negative_int) for key in _STAT_KEYS}
    examples, targetless = stats["num_examples"], stats["num_targetless_examples"]
    if examples is not INVALID and targetless is not INVALID and targetless > examples:
        add_error(
            errors,
            join(path, "num_targetless_examples"),
            f"must be <= num_examples ({examples}), got {targetless}",
        )
    return TaskPlan.from_spec(spec, **stats)


def _read_list(raw: Any, path: str, errors: list[str], what: str) -> list[Any]:
    if not isinstance(raw, list) or not raw:
        if raw is not INVALID:
            add_error(errors, path, f"must be a non-empty list of {what}, got {quote(raw)}")
        return []
    return raw


def _check_version(raw: Any) -> None:
    if not isinstance(raw, Mapping):
        raise PlanError([f"plan: must be a mapping, got {quote(raw)}"])
    if "schema_version" not in raw:
        raise PlanError([f"schema_version: missing; this runtime reads plan schema {SCHEMA_VERSION}"])
    version = raw["schema_version"]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        reads = f"this runtime reads plan schema {SCHEMA_VERSION}"
        raise PlanError([f"schema_version: {reads}, the file has {quote(version)}"])


def plan_from_dict(raw: Any) -> Plan:
    """Validate plain plan data (as loaded from YAML) and build the `Plan`."""
    _check_version(raw)
    errors: list[str] = []
    top = MappingReader(raw, "", errors, _PLAN_KEYS)
    j = MappingReader(top.get("job", as_is), "job", errors, _keys(JobSummary))
    absolute = path_checker(None, None)
    job = JobSummary(
        model=j.get("model", model_checker(None, check_paths=False)),
        dtype=j.get("dtype", one_of(*DTYPES)),
        output_dir=j.get("output_dir", absolute),
        spec_path=j.get("spec_path", optional(non_empty_str)),
    )
    fingerprint = top.get("fingerprint", _sha256_hex)
    backbone = top.get("backbone", as_is)
    if backbone is not INVALID:
        if isinstance(backbone, dict):
            _check_json_like(backbone, "backbone", errors)
        else:
            add_error(errors, "backbone", f"must be a mapping, got {quote(backbone)}")
    c = MappingReader(top.get("cluster", as_is), "cluster", errors, _keys(ClusterPlan))
    cluster = ClusterPlan(
        device=c.get("device", non_empty_str),
        num_devices=c.get("num_devices", positive_int),
        num_ranks=c.get("num_ranks", positive_int),
    )
    raw_tasks = _read_list(top.get("tasks", as_is), "tasks", errors, "tasks")
    tasks = tuple(_read_task(t, at("tasks", i), errors) for i, t in enumerate(raw_tasks))
    check_task_names((t.name for t in tasks), "tasks", errors)
    htasks = []
    for i, h in enumerate(_read_list(top.get("htasks", as_is), "htasks", errors, "hTasks")):
        r = MappingReader(h, at("htasks", i), errors, _keys(HTask), "hTask mapping")
        htasks.append(
            HTask(
                id=r.get("id", integer),
                tasks=r.get("tasks", _name_list),
                micro_batch_tokens=r.get("micro_batch_tokens", positive_int),
                token_budgets=r.get("token_budgets", _budget_list),
            )
        )
    a = MappingReader(top.get("alignment", as_is), "alignment", errors, _keys(Alignment))
    alignment = Alignment(
        chunk_size=a.get("chunk_size", positive_int),
        pack_order=a.get("pack_order", one_of(*PACK_ORDERS)),
    )
    raw_programs = _read_list(top.get("programs", as_is), "programs", errors, "rank programs")
    programs = tuple(_read_program(p, at("programs", i), errors) for i, p in enumerate(raw_programs))
    p = MappingReader(top.get("predictions", as_is), "predictions", errors, _keys(Predictions))
    predictions = Predictions(
        num_rounds=p.get("num_rounds", non_negative_int),
        tokens_per_round=p.get("tokens_per_round", non_negative_int),
        est_seconds_per_round=p.get("est_seconds_per_round", optional(non_negative_number)),
        est_peak_memory_bytes=p.get("est_peak_memory_bytes", optional(non_negative_int)),
    )
    plan = Plan(
        schema_version=SCHEMA_VERSION,
        job=job,
        fingerprint=fingerprint,
        backbone=backbone,
        cluster=cluster,
        tasks=tasks,
        htasks=tuple(htasks),
        alignment=alignment,
        programs=programs,
        predictions=predictions,
    )
    check_references(plan, errors)
    if errors:
        raise PlanError(errors)
    expected = compute_fingerprint(plan.backbone, plan.tasks, plan.htasks)
    if fingerprint != expected:
        says, hashes = fingerprint[:12], expected[:12]
        raise PlanError(
            [
                f"fingerprint: the plan says {says}..., its contents hash to {hashes}...; "
                "the plan was edited or corrupted"
            ]
        )
    return plan


def _sha256_hex(value: Any) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise Invalid(f"must be a sha256 hex digest (64 lowercase hex digits), got {quote(value)}")
    return value


def validate_plan(plan: Plan) -> Plan:
    """Check a plan built in Python exactly as `load_plan` checks a file; returns it with
    canonical value types (e.g. ``lr=1`` becomes ``1.0``), the form `save_plan` writes."""
    rebuilt = plan_from_dict(plan_to_dict(plan))
    if rebuilt != plan:
        raise PlanError(["plan: changes when serialized; a field holds a value YAML cannot keep"])
    return rebuilt
