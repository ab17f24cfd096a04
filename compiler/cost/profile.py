"""Measured profiles of a machine (`muxtune-profile`): the file format, torch-free.

A profile holds the machine's rates (GEMM FLOP/s, memory bandwidth, the cost of one eager op,
the memory a bare runtime process takes) and, when taken on a model, the wall time of the
backbone's decoder stack forward and backward, of the loss and of a task's optimizer step at
several micro-batch shapes. The compiler's cost model calibrates its analytic estimates with it.

The file is YAML with the keys in `Profile`'s field order, one measurement per line. Reading it
checks every field and raises one `ProfileError` listing every problem, each naming the file and
the field (``prof.yaml: measurements[2].seconds: must be a positive number, got -1``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from muxtune.common.errors import UserError
from muxtune.common.files import atomic_write_text
from muxtune.common.text import quote
from muxtune.common.yaml_io import YamlInputError, read_yaml_file
from muxtune.specs.checks import (
    INVALID,
    Invalid,
    MappingReader,
    add_error,
    as_is,
    at,
    check_json_like,
    join,
    non_empty_str,
    non_negative_int,
    one_of,
    optional,
    positive_int,
    positive_number,
)

PROFILE_VERSION = 1
COMPONENTS = ("layers_forward", "layers_backward", "loss", "optimizer")
PROFILE_DEVICES = ("cpu", "cuda")
PROFILE_DTYPES = ("fp32", "bf16", "fp16")
MAX_PROFILE_BYTES = 4 * 2**20
"""Largest profile file read (a profile holds a few dozen measurements)."""

_LAYER_COMPONENTS = ("layers_forward", "layers_backward")


class ProfileError(UserError):
    """A profile file that cannot be used; every problem names the file and the field."""


@dataclass(frozen=True)
class Measurement:
    """The median wall time of one call of a component at one micro-batch shape.

    `tokens` and `sequence_length` are 0 for the optimizer (every sequence of the micro-batch
    has `sequence_length` tokens otherwise); `target_tokens` is the scored rows of the loss (0
    for the other components); `trainable_parameters` is the task's trainable parameter count
    for the optimizer (0 for the others)."""

    component: str
    tokens: int
    sequence_length: int
    target_tokens: int
    trainable_parameters: int
    seconds: float


@dataclass(frozen=True)
class Profile:
    """What `muxtune-profile` measured on one machine (see the module docstring).

    `model` is the job spec's model string the measurements were taken on (None: rates only,
    no measurements), `backbone` that model's `BackboneConfig.to_dict()`; the measurement task
    is LoRA of rank `lora_rank` on q_proj and v_proj (c_attn for gpt2), alpha 2 r, dropout 0."""

    version: int
    device: str
    dtype: str
    machine: str
    threads: int
    matmul_flops: float
    memory_bandwidth: float
    op_overhead_seconds: float
    runtime_bytes: int
    model: str | None
    backbone: dict | None
    lora_rank: int
    measurements: tuple[Measurement, ...]

    def find(self, component: str) -> tuple[Measurement, ...]:
        """The measurements of one component, in file order."""
        return tuple(m for m in self.measurements if m.component == component)


_PROFILE_KEYS = tuple(f.name for f in dataclasses.fields(Profile))
_MEASUREMENT_KEYS = tuple(f.name for f in dataclasses.fields(Measurement))


def profile_to_dict(profile: Profile) -> dict[str, Any]:
    """Plain data in the file's key order; measurements become mappings."""
    out: dict[str, Any] = {}
    for name in _PROFILE_KEYS:
        value = getattr(profile, name)
        if name == "measurements":
            value = [{key: getattr(m, key) for key in _MEASUREMENT_KEYS} for m in value]
        elif name == "backbone" and value is not None:
            value = _plain(value)
        out[name] = value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _version(raw: Any, file: str) -> None:
    """Refuse a file that is not a mapping or not of `PROFILE_VERSION` before reading any further."""
    if not isinstance(raw, Mapping):
        raise ProfileError([f"{file}: must be a mapping of profile fields, got {quote(raw)}"])
    if "version" not in raw:
        raise ProfileError([f"{file}: version: missing required key; this muxtune reads profile version 1"])
    version = raw["version"]
    if version != PROFILE_VERSION or isinstance(version, bool):
        raise ProfileError(
            [
                f"{file}: version: this muxtune reads profile version {PROFILE_VERSION}, the file has "
                f"{quote(version)}; measure again with muxtune-profile"
            ]
        )


def _backbone(value: Any) -> dict:
    if not isinstance(value, dict) or not value:
        raise Invalid(f"must be a non-empty mapping (the backbone's config) or null, got {quote(value)}")
    return value


def _read_measurement(raw: Any, path: str, errors: list[str]) -> Measurement | Any:
    before = len(errors)
    r = MappingReader(raw, path, errors, _MEASUREMENT_KEYS)
    m = Measurement(
        component=r.get("component", one_of(*COMPONENTS, what="component")),
        tokens=r.get("tokens", non_negative_int),
        sequence_length=r.get("sequence_length", non_negative_int),
        target_tokens=r.get("target_tokens", non_negative_int),
        trainable_parameters=r.get("trainable_parameters", non_negative_int),
        seconds=r.get("seconds", positive_number),
    )
    if len(errors) > before:
        return INVALID
    _check_measurement(m, path, errors)
    return m if len(errors) == before else INVALID


def _check_measurement(m: Measurement, path: str, errors: list[str]) -> None:
    """What each component's fields must hold together."""

    def need(field: str, ok: bool, what: str) -> None:
        if not ok:
            add_error(errors, join(path, field), f"{what} for component {m.component}, got {getattr(m, field)}")

    if m.component == "optimizer":
        for field in ("tokens", "sequence_length", "target_tokens"):
            need(field, getattr(m, field) == 0, "must be 0")
        need("trainable_parameters", m.trainable_parameters > 0, "must be positive")
        return
    need("tokens", m.tokens > 0, "must be positive")
    need("sequence_length", 0 < m.sequence_length <= m.tokens, "must be positive and at most tokens")
    if 0 < m.sequence_length <= m.tokens and m.tokens % m.sequence_length:
        add_error(errors, join(path, "tokens"), f"must be a multiple of sequence_length {m.sequence_length}")
    need("trainable_parameters", m.trainable_parameters == 0, "must be 0")
    if m.component == "loss":
        need("target_tokens", 0 < m.target_tokens <= m.tokens, "must be positive and at most tokens")
    else:
        need("target_tokens", m.target_tokens == 0, "must be 0")


def profile_from_dict(raw: Any, file: str = "profile") -> Profile:
    """Validate plain profile data (as loaded from YAML) and build the `Profile`; every problem
    is one line of the `ProfileError`, prefixed with ``file``."""
    _version(raw, file)
    errors: list[str] = []
    top = MappingReader(raw, "", errors, _PROFILE_KEYS)
    fields: dict[str, Any] = {
        "version": PROFILE_VERSION,
        "device": top.get("device", one_of(*PROFILE_DEVICES, what="device")),
        "dtype": top.get("dtype", one_of(*PROFILE_DTYPES, what="dtype")),
        "machine": top.get("machine", non_empty_str),
        "threads": top.get("threads", positive_int),
        "matmul_flops": top.get("matmul_flops", positive_number),
        "memory_bandwidth": top.get("memory_bandwidth", positive_number),
        "op_overhead_seconds": top.get("op_overhead_seconds", positive_number),
        "runtime_bytes": top.get("runtime_bytes", positive_int),
        "model": top.get("model", optional(non_empty_str)),
        "backbone": top.get("backbone", optional(_backbone)),
        "lora_rank": top.get("lora_rank", positive_int),
    }
    model, backbone = fields["model"], fields["backbone"]
    if isinstance(backbone, dict):
        check_json_like(backbone, "backbone", errors)
    measurements: Any = top.get("measurements", as_is)
    if measurements is not INVALID:
        if not isinstance(measurements, list):
            add_error(errors, "measurements", f"must be a list, got {quote(measurements)}")
            measurements = INVALID
        else:
            measurements = tuple(
                _read_measurement(m, at("measurements", i), errors) for i, m in enumerate(measurements)
            )
    profile = Profile(**fields, measurements=measurements)
    if model is not INVALID and backbone is not INVALID and (model is None) != (backbone is None):
        add_error(errors, "backbone", "must be given exactly when model is (the backbone the measurements ran on)")
    if model is None and isinstance(measurements, tuple) and measurements:
        add_error(errors, "measurements", "must be empty when model is null (rates only)")
    if model is not None and model is not INVALID and isinstance(measurements, tuple) and not errors:
        missing = [c for c in COMPONENTS if not any(m.component == c for m in measurements)]
        if missing:
            add_error(errors, "measurements", f"has no measurement of {', '.join(missing)}")
    if errors:
        raise ProfileError([f"{file}: {error}" for error in errors])
    return profile


def validate_profile(profile: Profile) -> Profile:
    """Check a profile built in Python exactly as `load_profile` checks a file; returns it with
    canonical value types (e.g. ``seconds=1`` becomes ``1.0``)."""
    return profile_from_dict(profile_to_dict(profile), "profile")


class _ProfileDumper(yaml.SafeDumper):
    """Block style, except measurements and lists of scalars (flow style, one per line)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


class _FlowDict(dict):
    """A mapping written on one line."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(isinstance(item, (str, int, float, bool, type(None))) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_flow_dict(dumper: yaml.SafeDumper, data: _FlowDict) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=True)


_ProfileDumper.add_representer(list, _represent_list)
_ProfileDumper.add_representer(_FlowDict, _represent_flow_dict)


def dump_profile(profile: Profile) -> str:
    """The profile file's text (validates first). The same profile always gives the same text."""
    data = profile_to_dict(validate_profile(profile))
    data["measurements"] = [_FlowDict(m) for m in data["measurements"]]
    return yaml.dump(data, Dumper=_ProfileDumper, sort_keys=False, allow_unicode=False, width=1000)


def save_profile(profile: Profile, path: Path | str) -> Path:
    """Validate and write ``profile`` atomically as YAML; returns the path."""
    return atomic_write_text(path, dump_profile(profile))


def load_profile(path: Path | str) -> Profile:
    """Read and fully validate a profile file; `ProfileError` names the file and each bad field."""
    try:
        raw = read_yaml_file(path, max_bytes=MAX_PROFILE_BYTES)
    except YamlInputError as exc:
        raise ProfileError(exc.errors) from None
    if raw is None:
        raise ProfileError([f"{path}: the profile file is empty"])
    return profile_from_dict(raw, str(path))
