"""Loading, validating and serializing job specs.

Validation never stops at the first problem: every error is collected under its field path
(``tasks[1].peft.r``) and raised together as one `SpecError`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from muxtune.common.text import quote
from muxtune.common.yaml_io import YamlInputError, read_yaml_file

from .checks import (
    INVALID,
    MISSING,
    Checker,
    Invalid,
    MappingReader,
    add_error,
    as_is,
    at,
    auto_or,
    int_in_range,
    join,
    matches,
    non_empty_str,
    non_negative_int,
    non_negative_number,
    one_of,
    optional,
    positive_number,
)
from .errors import SpecError
from .overrides import apply_overrides
from .peft import read_peft
from .schema import (
    BUILTIN_PREFIX,
    DATA_FORMATS,
    DEVICES,
    DTYPES,
    MAX_BATCH_SIZE,
    MAX_DEVICES,
    MAX_SEED,
    MAX_SEQ_LEN,
    MAX_STEPS,
    NO_REPORTING,
    REPORTERS,
    SCHEDULES,
    TASK_NAME_PATTERN,
    ClusterSpec,
    DataSpec,
    JobSpec,
    ScheduleSpec,
    TaskSpec,
)

_JOB_KEYS = ("model", "dtype", "output_dir", "cluster", "tasks", "report_to")
_TASK_KEYS = tuple(f.name for f in dataclasses.fields(TaskSpec))
_DATA_KEYS = tuple(f.name for f in dataclasses.fields(DataSpec))
_SCHEDULE_KEYS = tuple(f.name for f in dataclasses.fields(ScheduleSpec))
_CLUSTER_KEYS = tuple(f.name for f in dataclasses.fields(ClusterSpec))

sequence_length = int_in_range(1, MAX_SEQ_LEN, "(tokens per sequence)")
batch_size = int_in_range(1, MAX_BATCH_SIZE, "(sequences per optimizer step)")
step_count = int_in_range(1, MAX_STEPS)
step_interval = int_in_range(0, MAX_STEPS)
seed = int_in_range(0, MAX_SEED, "(a 64-bit seed)")
device_count = int_in_range(1, MAX_DEVICES)

task_name = matches(TASK_NAME_PATTERN, TASK_NAME_PATTERN)
"""Checker for task names: also the output subfolder, so no separators or dots."""


def report_to_list(value: Any) -> tuple[str, ...]:
    """``report_to`` as HF's TrainingArguments takes it: ``none`` (or null, or an empty list), one
    integration from `REPORTERS`, or a list of them; the integrations, in order (empty for none)."""
    allowed = (NO_REPORTING, *REPORTERS)
    check_name = one_of(*allowed, what="integration")
    if value is None:
        return ()
    if isinstance(value, str):
        name = check_name(value)
        return () if name == NO_REPORTING else (name,)
    if not isinstance(value, list):
        raise Invalid(f"must be {', '.join(repr(a) for a in allowed)} or a list of them, got {quote(value)}")
    names = tuple(check_name(item) for item in value)
    if NO_REPORTING in names:
        if len(names) > 1:
            raise Invalid(f"{NO_REPORTING!r} cannot be listed with other integrations, got {quote(value)}")
        return ()
    if len(set(names)) != len(names):
        raise Invalid(f"must not repeat an integration, got {quote(value)}")
    return names


def path_checker(base_dir: Path | None, must_be: str | None) -> Checker:
    """Resolve a path against ``base_dir`` (None: it must already be absolute).

    ``must_be`` is ``"file"``, ``"dir"``, ``"exists"`` or None (no existence check).
    """

    def check(value: Any) -> str:
        text = non_empty_str(value)
        expanded = os.path.expanduser(text)
        if os.path.isabs(expanded):
            resolved = os.path.normpath(expanded)
        elif base_dir is None:
            raise Invalid(f"must be an absolute path, got {quote(value)}")
        else:
            resolved = os.path.normpath(os.path.join(os.path.abspath(base_dir), expanded))
        if must_be == "file" and not os.path.isfile(resolved):
            if os.path.isdir(resolved):
                raise Invalid(f"is a directory, not a file: {resolved}")
            raise Invalid(f"file not found: {resolved}")
        if must_be == "dir" and not os.path.isdir(resolved):
            raise Invalid(f"directory not found: {resolved}")
        if must_be == "exists" and not os.path.exists(resolved):
            raise Invalid(f"not found: {resolved}")
        return resolved

    return check


def model_checker(base_dir: Path | None, check_paths: bool) -> Checker:
    """``builtin:NAME`` as is, or a model path resolved (and, if asked, checked) like a path."""
    resolve = path_checker(base_dir, "exists" if check_paths else None)

    def check(value: Any) -> str:
        text = non_empty_str(value)
        if text.startswith(BUILTIN_PREFIX):
            if not text[len(BUILTIN_PREFIX) :].strip():
                raise Invalid(f"a builtin model needs a name after {quote(BUILTIN_PREFIX)}")
            return text
        return resolve(text)

    return check


def _nested(task: MappingReader, key: str, required: bool) -> Any:
    """The raw nested mapping at ``key``: ``{}`` (all defaults) when absent or null and optional,
    `INVALID` when absent and required (the error is recorded) or when the task is not a mapping."""
    if not task.ok:
        return INVALID
    if key in task.raw and (task.raw[key] is not None or required):
        return task.raw[key]
    if required:
        task.get(key, as_is)
        return INVALID
    return {}


def read_task(
    raw: Any,
    path: str,
    errors: list[str],
    *,
    base_dir: Path | None,
    check_paths: bool,
    require_all: bool = False,
    extra_keys: Sequence[str] = (),
) -> tuple[TaskSpec, MappingReader]:
    """Check one task mapping; returns the task and the reader (for ``extra_keys``).

    ``require_all`` turns every default off (plans store fully resolved tasks). Fields that
    failed their check hold `INVALID`; the errors are in ``errors``.
    """

    def default(value: Any) -> Any:
        return MISSING if require_all else value

    task = MappingReader(raw, path, errors, _TASK_KEYS + tuple(extra_keys), "task mapping")
    name = task.get("name", task_name)

    peft: Any = INVALID
    peft_raw = _nested(task, "peft", require_all)
    if peft_raw is not INVALID:
        peft = read_peft(peft_raw, join(path, "peft"), errors, require_all=require_all)

    data: Any = INVALID
    data_raw = _nested(task, "data", required=True)
    if data_raw is not INVALID:
        d = MappingReader(data_raw, join(path, "data"), errors, _DATA_KEYS)
        data = DataSpec(
            path=d.get("path", path_checker(base_dir, "file" if check_paths else None)),
            format=d.get("format", one_of(*DATA_FORMATS)),
        )

    steps = task.get("steps", step_count, default(50))
    schedule: Any = INVALID
    schedule_raw = _nested(task, "schedule", require_all)
    if schedule_raw is not INVALID:
        s = MappingReader(schedule_raw, join(path, "schedule"), errors, _SCHEDULE_KEYS)
        schedule = ScheduleSpec(
            name=s.get("name", one_of(*SCHEDULES), default("constant")),
            warmup_steps=s.get("warmup_steps", non_negative_int, default(0)),
        )
        warmup = schedule.warmup_steps
        if warmup is not INVALID and steps is not INVALID and warmup > steps:
            add_error(
                errors,
                join(path, "schedule.warmup_steps"),
                f"must be <= steps ({steps}), got {warmup}",
            )

    init_checker = path_checker(base_dir, "dir" if check_paths else None)
    spec = TaskSpec(
        name=name,
        peft=peft,
        data=data,
        max_seq_len=task.get("max_seq_len", sequence_length, default(128)),
        batch_size=task.get("batch_size", batch_size, default(8)),
        lr=task.get("lr", positive_number, default(2e-4)),
        weight_decay=task.get("weight_decay", non_negative_number, default(0.0)),
        max_grad_norm=task.get("max_grad_norm", positive_number, default(1.0)),
        schedule=schedule,
        steps=steps,
        seed=task.get("seed", seed, default(0)),
        init_from=task.get("init_from", optional(init_checker), default(None)),
        save_every=task.get("save_every", step_interval, default(0)),
    )
    return spec, task


def check_task_names(names: Iterable[Any], path: str, errors: list[str]) -> None:
    """Record duplicate task names (``tasks[2].name: duplicate task name 'a' (also tasks[0])``)."""
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if not isinstance(name, str) or name is INVALID:
            continue
        if name in seen:
            add_error(
                errors,
                join(at(path, index), "name"),
                f"duplicate task name {quote(name)} (also {at(path, seen[name])})",
            )
        else:
            seen[name] = index


def _read_cluster(raw: Any, errors: list[str]) -> ClusterSpec:
    c = MappingReader(raw, "cluster", errors, _CLUSTER_KEYS)
    cluster = ClusterSpec(
        device=c.get("device", one_of(*DEVICES), "auto"),
        num_devices=c.get("num_devices", device_count, 1),
        memory_gb=c.get("memory_gb", auto_or(positive_number), "auto"),
        pipeline_parallel=c.get("pipeline_parallel", auto_or(device_count), "auto"),
        tensor_parallel=c.get("tensor_parallel", auto_or(device_count), "auto"),
    )
    degrees = [d for d in (cluster.pipeline_parallel, cluster.tensor_parallel) if isinstance(d, int)]
    if isinstance(cluster.num_devices, int) and degrees:
        product = 1
        for degree in degrees:
            product *= degree
        if cluster.num_devices % product:
            add_error(
                errors,
                "cluster",
                f"pipeline_parallel x tensor_parallel ({product}) must divide num_devices ({cluster.num_devices})",
            )
    return cluster


def parse_job_spec(raw: Any, base_dir: Path | str | None = None, overrides: Sequence[str] = ()) -> JobSpec:
    """Validate a raw (YAML-loaded) job spec and resolve its defaults and paths.

    Relative paths are resolved against ``base_dir`` (default: the current directory);
    ``overrides`` (``key=value``) are applied first. Raises `SpecError` with every error.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    errors: list[str] = []
    if overrides:
        raw = apply_overrides(raw, overrides, errors)
    if not isinstance(raw, dict):
        raise SpecError([*errors, f"job spec: must be a mapping, got {quote(raw)}"])
    job = MappingReader(raw, "", errors, _JOB_KEYS)
    model = job.get("model", model_checker(base, check_paths=True))
    dtype = job.get("dtype", one_of(*DTYPES), "fp32")
    output_dir = job.get("output_dir", path_checker(base, None))
    report_to = job.get("report_to", report_to_list, ())
    raw_cluster = job.raw.get("cluster")
    cluster = _read_cluster({} if raw_cluster is None else raw_cluster, errors)

    tasks: list[TaskSpec] = []
    raw_tasks = job.raw.get("tasks", MISSING)
    if raw_tasks is MISSING:
        add_error(errors, "tasks", "missing required key")
    elif not isinstance(raw_tasks, list):
        add_error(errors, "tasks", f"must be a list of task mappings, got {quote(raw_tasks)}")
    elif not raw_tasks:
        add_error(errors, "tasks", "at least one task is required")
    else:
        for index, raw_task in enumerate(raw_tasks):
            task, _ = read_task(raw_task, at("tasks", index), errors, base_dir=base, check_paths=True)
            tasks.append(task)
        check_task_names((t.name for t in tasks), "tasks", errors)
    if errors:
        raise SpecError(errors)
    return JobSpec(
        model=model, dtype=dtype, output_dir=output_dir, cluster=cluster, tasks=tuple(tasks), report_to=report_to
    )


def load_job_spec(path: Path | str, overrides: Sequence[str] = ()) -> JobSpec:
    """Read, override and validate a job spec file; relative paths are against its folder."""
    file = Path(path)
    try:
        raw = read_yaml_file(file)
    except YamlInputError as exc:
        raise SpecError([str(exc)]) from None
    if raw is None:
        raise SpecError([f"{file}: the job spec is empty"])
    if not isinstance(raw, dict):
        raise SpecError([f"{file}: must hold a mapping at the top level, got {type(raw).__name__}"])
    return parse_job_spec(raw, file.absolute().parent, overrides)


def to_plain(value: Any) -> Any:
    """Dataclasses to dicts (field order kept), tuples to lists; for YAML and JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def job_spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    """The fully resolved spec as plain data; `parse_job_spec` of it gives ``spec`` back.
    ``report_to`` is left out when the job reports nowhere (its default)."""
    data = to_plain(spec)
    if not spec.report_to:
        del data["report_to"]
    return data
