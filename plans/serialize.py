"""Plan <-> plain data, with full validation on the way in.

`plan_from_dict` checks the schema version first (a plan of another version is not read any
further), then every field, the cross references and the rank programs (`references`), and
finally the fingerprint. All errors are collected and raised as one `PlanError`.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from muxtune.common.text import quote
from muxtune.specs import DTYPES
from muxtune.specs.checks import (
    INVALID,
    MAX_INT,
    MISSING,
    Checker,
    Invalid,
    MappingReader,
    add_error,
    as_is,
    at,
    check_json_like,
    did_you_mean,
    int_in_range,
    integer,
    join,
    non_empty_str,
    non_negative_int,
    one_of,
    optional,
    positive_int,
)
from muxtune.specs.parse import (
    check_task_names,
    model_checker,
    path_checker,
    read_task,
    report_to_list,
    task_name,
    to_plain,
)

from .errors import PlanError
from .fingerprint import compute_fingerprint
from .instructions import INSTRUCTION_TYPES, Instruction, Opcode, instruction_to_dict, payload_fields
from .predictions import read_predictions, read_solver_reports
from .references import check_references
from .schema import (
    PACK_ORDERS,
    SCHEMA_VERSION,
    SUBGRAPH_KINDS,
    Alignment,
    HTask,
    JobSummary,
    Partition,
    Phase,
    Placement,
    Plan,
    RankProgram,
    Stage,
    Subgraph,
    TaskPlan,
)

_PLAN_KEYS = tuple(f.name for f in dataclasses.fields(Plan))
_STAT_KEYS = ("num_examples", "num_targetless_examples", "num_tokens")
_OPS = tuple(op.value for op in Opcode)
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{16,64}")
_EVENT_RE = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")


def _keys(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _program_to_dict(program: RankProgram) -> dict[str, Any]:
    return {
        "rank": program.rank,
        "device": program.device,
        "stage": program.stage,
        "prologue": [instruction_to_dict(i) for i in program.prologue],
        "phases": [[instruction_to_dict(i) for i in body] for body in program.phases],
        "epilogue": [instruction_to_dict(i) for i in program.epilogue],
    }


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """Plain data in the file's key order (``schema_version`` first); tuples become lists."""
    out: dict[str, Any] = {}
    for name in _PLAN_KEYS:
        value = getattr(plan, name)
        if name == "programs":
            out[name] = [_program_to_dict(p) for p in value]
        elif name == "backbone":
            out[name] = copy.deepcopy(value)
        else:
            out[name] = to_plain(value)
    return out


def _name_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise Invalid(f"must be a non-empty list of task names, got {quote(value)}")
    for item in value:
        task_name(item)
    if len(set(value)) != len(value):
        raise Invalid(f"must not repeat a task name, got {quote(value)}")
    return tuple(value)


def _int_list(value: Any) -> tuple[int, ...]:
    """A non-empty list of distinct non-negative integers (ranks, rounds)."""

    def ok(item: Any) -> bool:
        return isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= MAX_INT

    if not isinstance(value, list) or not value or not all(ok(item) for item in value):
        raise Invalid(f"must be a non-empty list of non-negative integers, got {quote(value)}")
    if len(set(value)) != len(value):
        raise Invalid(f"must not repeat a number, got {quote(value)}")
    return tuple(value)


def _budget_list(value: Any) -> tuple[int, ...]:
    def ok(item: Any) -> bool:
        return isinstance(item, int) and not isinstance(item, bool) and 0 < item <= MAX_INT

    if not isinstance(value, list) or not value or not all(ok(item) for item in value):
        raise Invalid(f"must be a non-empty list of positive integers, got {quote(value)}")
    return tuple(value)


def _str_list(what: str, allow_empty: bool = False) -> Checker:
    """A list of distinct non-empty strings (graph value names)."""

    def check(value: Any) -> tuple[str, ...]:
        ok = isinstance(value, list) and (allow_empty or value)
        if not ok or not all(isinstance(item, str) and item.strip() for item in value):
            kind = "list" if allow_empty else "non-empty list"
            raise Invalid(f"must be a {kind} of {what} (non-empty strings), got {quote(value)}")
        if len(set(value)) != len(value):
            raise Invalid(f"must not repeat a name, got {quote(value)}")
        return tuple(value)

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, got {quote(value)}")
    return value


def _event_name(value: Any) -> str:
    if not isinstance(value, str) or not _EVENT_RE.fullmatch(value):
        raise Invalid(f"must be an event name (1-128 letters, digits, '_', '.', ':', '/', '-'), got {quote(value)}")
    return value


def _sha256_hex(value: Any) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise Invalid(f"must be a sha256 hex digest (64 lowercase hex digits), got {quote(value)}")
    return value


_PAYLOAD_CHECKERS: dict[Any, Checker] = {
    int: non_negative_int,
    bool: _boolean,
    str: _event_name,
    tuple[str, ...]: _name_list,
    tuple[int, ...]: _int_list,
}
_layer = int_in_range(-1, MAX_INT)


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
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    values = {
        name: reader.get(name, _PAYLOAD_CHECKERS[hint], defaults.get(name, MISSING)) for name, hint in fields.items()
    }
    if len(errors) > before:
        errors[before:] = [f"{e} (op {op})" for e in errors[before:]]
        return INVALID
    return cls(**values)


def _read_instructions(raw: Any, path: str, errors: list[str]) -> tuple[Instruction, ...] | Any:
    if raw is INVALID:
        return INVALID
    if not isinstance(raw, list):
        add_error(errors, path, f"must be a list of instructions, got {quote(raw)}")
        return INVALID
    return tuple(_read_instruction(item, at(path, i), errors) for i, item in enumerate(raw))


def _read_program(raw: Any, path: str, errors: list[str]) -> RankProgram:
    r = MappingReader(raw, path, errors, _keys(RankProgram), "rank program mapping")
    bodies: Any = r.get("phases", as_is)
    if bodies is not INVALID:
        if isinstance(bodies, list):
            where = join(path, "phases")
            bodies = tuple(_read_instructions(body, at(where, i), errors) for i, body in enumerate(bodies))
        else:
            add_error(errors, join(path, "phases"), f"must be a list of round bodies, got {quote(bodies)}")
            bodies = INVALID
    return RankProgram(
        rank=r.get("rank", non_negative_int),
        device=r.get("device", non_empty_str),
        stage=r.get("stage", non_negative_int),
        prologue=_read_instructions(r.get("prologue", as_is), join(path, "prologue"), errors),
        phases=bodies,
        epilogue=_read_instructions(r.get("epilogue", as_is), join(path, "epilogue"), errors),
    )


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


def _read_list(raw: Any, path: str, errors: list[str], what: str) -> tuple[Any, ...] | Any:
    """The items of a non-empty list; `INVALID` (error recorded) for anything else."""
    if not isinstance(raw, list) or not raw:
        if raw is not INVALID:
            add_error(errors, path, f"must be a non-empty list of {what}, got {quote(raw)}")
        return INVALID
    return tuple(raw)


def _read_placement(raw: Any, errors: list[str]) -> Placement:
    p = MappingReader(raw, "placement", errors, _keys(Placement))
    stages: Any = _read_list(p.get("stages", as_is), "placement.stages", errors, "stages")
    if stages is not INVALID:
        read = []
        for i, item in enumerate(stages):
            s = MappingReader(item, at("placement.stages", i), errors, _keys(Stage), "stage mapping")
            read.append(
                Stage(
                    id=s.get("id", integer),
                    ranks=s.get("ranks", _int_list),
                    first_layer=s.get("first_layer", non_negative_int),
                    last_layer=s.get("last_layer", non_negative_int),
                )
            )
        stages = tuple(read)
    return Placement(
        device=p.get("device", non_empty_str),
        num_devices=p.get("num_devices", positive_int),
        num_ranks=p.get("num_ranks", positive_int),
        pipeline_parallel=p.get("pipeline_parallel", positive_int),
        tensor_parallel=p.get("tensor_parallel", positive_int),
        data_parallel=p.get("data_parallel", positive_int),
        stages=stages,
    )


def _digest(value: Any) -> str:
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        raise Invalid(f"must be a node digest ('sha256:' and 16-64 lowercase hex digits), got {quote(value)}")
    return value


def _read_partition(raw: Any, errors: list[str]) -> Partition:
    p = MappingReader(raw, "partition", errors, _keys(Partition))
    where = "partition.subgraphs"
    subgraphs: Any = _read_list(p.get("subgraphs", as_is), where, errors, "subgraphs")
    if subgraphs is not INVALID:
        read = []
        for i, item in enumerate(subgraphs):
            s = MappingReader(item, at(where, i), errors, _keys(Subgraph), "subgraph mapping")
            read.append(
                Subgraph(
                    id=s.get("id", integer),
                    kind=s.get("kind", one_of(*SUBGRAPH_KINDS)),
                    stage=s.get("stage", non_negative_int),
                    first_layer=s.get("first_layer", _layer),
                    last_layer=s.get("last_layer", _layer),
                    first_node=s.get("first_node", non_empty_str),
                    last_node=s.get("last_node", non_empty_str),
                    num_nodes=s.get("num_nodes", positive_int),
                    digest=s.get("digest", _digest),
                    inputs=s.get("inputs", _str_list("value names", allow_empty=True)),
                    outputs=s.get("outputs", _str_list("value names")),
                )
            )
        subgraphs = tuple(read)
    return Partition(
        policy=p.get("policy", non_empty_str),
        inputs=p.get("inputs", _str_list("value names")),
        outputs=p.get("outputs", _str_list("value names")),
        subgraphs=subgraphs,
    )


def _read_htask(raw: Any, path: str, errors: list[str]) -> HTask:
    r = MappingReader(raw, path, errors, _keys(HTask), "hTask mapping")
    return HTask(
        id=r.get("id", integer),
        tasks=r.get("tasks", _name_list),
        micro_batch_tokens=r.get("micro_batch_tokens", positive_int),
        token_budgets=r.get("token_budgets", _budget_list),
        num_microbatches=r.get("num_microbatches", positive_int),
    )


def _read_phase(raw: Any, path: str, errors: list[str]) -> Phase:
    r = MappingReader(raw, path, errors, _keys(Phase), "phase mapping")
    where = join(path, "htasks")
    htasks: Any = _read_list(r.get("htasks", as_is), where, errors, "hTasks")
    if htasks is not INVALID:
        htasks = tuple(_read_htask(h, at(where, i), errors) for i, h in enumerate(htasks))
    return Phase(
        id=r.get("id", integer),
        first_round=r.get("first_round", positive_int),
        num_rounds=r.get("num_rounds", positive_int),
        tasks=r.get("tasks", _name_list),
        htasks=htasks,
        rounds_per_body=r.get("rounds_per_body", positive_int, 1),
    )


def _check_version(raw: Any) -> None:
    if not isinstance(raw, Mapping):
        raise PlanError([f"plan: must be a mapping, got {quote(raw)}"])
    if "schema_version" not in raw:
        raise PlanError([f"schema_version: missing; this runtime reads plan schema {SCHEMA_VERSION}"])
    version = raw["schema_version"]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        message = f"schema_version: this runtime reads plan schema {SCHEMA_VERSION}, the file has {quote(version)}"
        if isinstance(version, int) and not isinstance(version, bool) and 1 <= version < SCHEMA_VERSION:
            message += "; compile the job again (muxtune-compile)"
        raise PlanError([message])


def plan_from_dict(raw: Any) -> Plan:
    """Validate plain plan data (as loaded from YAML) and build the `Plan`."""
    _check_version(raw)
    errors: list[str] = []
    top = MappingReader(raw, "", errors, _PLAN_KEYS)
    j = MappingReader(top.get("job", as_is), "job", errors, _keys(JobSummary))
    job = JobSummary(
        model=j.get("model", model_checker(None, check_paths=False)),
        dtype=j.get("dtype", one_of(*DTYPES)),
        output_dir=j.get("output_dir", path_checker(None, None)),
        spec_path=j.get("spec_path", optional(non_empty_str)),
        report_to=j.get("report_to", report_to_list, ()),
    )
    fingerprint = top.get("fingerprint", _sha256_hex)
    backbone = top.get("backbone", as_is)
    if backbone is not INVALID:
        if isinstance(backbone, dict):
            check_json_like(backbone, "backbone", errors)
        else:
            add_error(errors, "backbone", f"must be a mapping, got {quote(backbone)}")
            backbone = INVALID
    placement = _read_placement(top.get("placement", as_is), errors)
    partition = _read_partition(top.get("partition", as_is), errors)
    tasks: Any = _read_list(top.get("tasks", as_is), "tasks", errors, "tasks")
    if tasks is not INVALID:
        tasks = tuple(_read_task(t, at("tasks", i), errors) for i, t in enumerate(tasks))
        check_task_names((t.name for t in tasks), "tasks", errors)
    a = MappingReader(top.get("alignment", as_is), "alignment", errors, _keys(Alignment))
    alignment = Alignment(
        chunk_size=a.get("chunk_size", positive_int),
        pack_order=a.get("pack_order", one_of(*PACK_ORDERS)),
    )
    phases: Any = _read_list(top.get("phases", as_is), "phases", errors, "phases")
    if phases is not INVALID:
        phases = tuple(_read_phase(p, at("phases", i), errors) for i, p in enumerate(phases))
    programs: Any = _read_list(top.get("programs", as_is), "programs", errors, "rank programs")
    if programs is not INVALID:
        programs = tuple(_read_program(p, at("programs", i), errors) for i, p in enumerate(programs))
    predictions = read_predictions(top.get("predictions", as_is), errors)
    solver = read_solver_reports(top.get("solver", as_is, []), errors)
    plan = Plan(
        schema_version=SCHEMA_VERSION,
        job=job,
        fingerprint=fingerprint,
        backbone=backbone,
        placement=placement,
        partition=partition,
        tasks=tasks,
        alignment=alignment,
        phases=phases,
        programs=programs,
        predictions=predictions,
        solver=solver,
    )
    check_references(plan, errors)
    if errors:
        raise PlanError(errors)
    expected = compute_fingerprint(plan.backbone, plan.tasks, plan.phases, plan.partition)
    if fingerprint != expected:
        says, hashes = fingerprint[:12], expected[:12]
        raise PlanError(
            [
                f"fingerprint: the plan says {says}..., its contents hash to {hashes}...; "
                "the plan was edited or corrupted"
            ]
        )
    return plan


def validate_plan(plan: Plan) -> Plan:
    """Check a plan built in Python exactly as `load_plan` checks a file; returns it with
    canonical value types (e.g. ``lr=1`` becomes ``1.0``), the form `save_plan` writes."""
    rebuilt = plan_from_dict(plan_to_dict(plan))
    if rebuilt != plan:
        raise PlanError(["plan: changes when serialized; a field holds a value YAML cannot keep"])
    return rebuilt
