"""PEFT method configurations: one frozen dataclass per method, tagged by `method`.

Field names follow peft's config classes (`LoraConfig`, `IA3Config`, `PrefixTuningConfig`,
`PromptTuningConfig`) so users can carry their configs over; `adapter` and `bias` are methods
peft lacks. Each class lists its field checkers in `FIELD_CHECKS` and its cross-field rules in
`cross_field_errors`, so `read_peft` validates every method the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union

from muxtune.common.text import quote

from .checks import (
    INVALID,
    MISSING,
    Checker,
    Invalid,
    MappingReader,
    add_error,
    identifier_list,
    int_in_range,
    join,
    non_empty_str,
    one_of,
    optional,
    positive_number_keep_int,
    unit_interval,
)

MAX_LORA_RANK = 65_536
MAX_VIRTUAL_TOKENS = 65_536
MAX_BOTTLENECK = 1_048_576
ADAPTER_ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "gelu_new", "silu", "swish", "tanh")
PROMPT_TUNING_INITS: tuple[str, ...] = ("RANDOM", "TEXT")
ADAPTER_VARIANTS: tuple[str, ...] = ("houlsby", "pfeiffer")
FEEDFORWARD_MODULES: tuple[str, ...] = ("down_proj", "fc2", "mlp.c_proj")
"""MLP output projections (LLaMA, OPT, GPT-2): (IA)^3's default feedforward modules among its targets."""


def boolean(value: Any) -> bool:
    """A YAML boolean."""
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, got {quote(value)}")
    return value


lora_rank = int_in_range(1, MAX_LORA_RANK)
virtual_token_count = int_in_range(1, MAX_VIRTUAL_TOKENS, "(virtual tokens)")
bottleneck_width = int_in_range(1, MAX_BOTTLENECK)


@dataclass(frozen=True)
class LoraSpec:
    """LoRA, rsLoRA (`use_rslora`) and DoRA (`use_dora`), as peft's `LoraConfig`
    (`alpha` is peft's `lora_alpha`, `dropout` its `lora_dropout`)."""

    method: Literal["lora"] = "lora"
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False
    use_dora: bool = False

    FIELD_CHECKS: ClassVar[dict[str, Checker]] = {
        "r": lora_rank,
        "alpha": positive_number_keep_int,
        "dropout": unit_interval,
        "target_modules": identifier_list,
        "use_rslora": boolean,
        "use_dora": boolean,
    }

    def cross_field_errors(self) -> list[tuple[str, str]]:
        return []


@dataclass(frozen=True)
class IA3Spec:
    """(IA)^3, as peft's `IA3Config`: learned scales on the outputs of `target_modules`, and on
    the inputs of those also in `feedforward_modules` (the MLP intermediate)."""

    method: Literal["ia3"] = "ia3"
    target_modules: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    feedforward_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.feedforward_modules is None:  # default: the targets that are MLP output projections
            ff = tuple(m for m in self.target_modules if m in FEEDFORWARD_MODULES)
            object.__setattr__(self, "feedforward_modules", ff)

    FIELD_CHECKS: ClassVar[dict[str, Checker]] = {
        "target_modules": identifier_list,
        "feedforward_modules": lambda value: () if value == [] else identifier_list(value),
    }

    def cross_field_errors(self) -> list[tuple[str, str]]:
        extra = [m for m in self.feedforward_modules if m not in self.target_modules]
        if extra:
            return [("feedforward_modules", f"must be a subset of target_modules, but {quote(extra[0])} is not")]
        return []


@dataclass(frozen=True)
class PrefixTuningSpec:
    """Prefix tuning, as peft's `PrefixTuningConfig`: `num_virtual_tokens` learned keys and values
    per layer, optionally reparameterized by an MLP (`prefix_projection`, hidden width
    `encoder_hidden_size`, default peft's: the width of one layer's keys, kv heads x head dim)."""

    method: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None

    FIELD_CHECKS: ClassVar[dict[str, Checker]] = {
        "num_virtual_tokens": virtual_token_count,
        "prefix_projection": boolean,
        "encoder_hidden_size": optional(bottleneck_width),
    }

    def cross_field_errors(self) -> list[tuple[str, str]]:
        if self.encoder_hidden_size is not None and not self.prefix_projection:
            return [("encoder_hidden_size", "is only used with prefix_projection: true")]
        return []


@dataclass(frozen=True)
class PromptTuningSpec:
    """Prompt tuning, as peft's `PromptTuningConfig`: `num_virtual_tokens` learned soft tokens
    before each of the task's sequences, initialized at random or from the embeddings of
    `prompt_tuning_init_text` (`prompt_tuning_init: TEXT`)."""

    method: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = 20
    prompt_tuning_init: Literal["RANDOM", "TEXT"] = "RANDOM"
    prompt_tuning_init_text: str | None = None

    FIELD_CHECKS: ClassVar[dict[str, Checker]] = {
        "num_virtual_tokens": virtual_token_count,
        "prompt_tuning_init": one_of(*PROMPT_TUNING_INITS),
        "prompt_tuning_init_text": optional(non_empty_str),
    }

    def cross_field_errors(self) -> list[tuple[str, str]]:
        if self.prompt_tuning_init == "TEXT" and self.prompt_tuning_init_text is None:
            return [("prompt_tuning_init_text", "is required with prompt_tuning_init: TEXT")]
        if self.prompt_tuning_init != "TEXT" and self.prompt_tuning_init_text is not None:
            return [("prompt_tuning_init_text", "is only used with prompt_tuning_init: TEXT")]
        return []


@dataclass(frozen=True)
class AdapterSpec:
    """Bottleneck adapters: `x + up(act(down(x)))` after each block's attention output and MLP
    output (`houlsby`) or after the MLP output only (`pfeiffer`)."""

    method: Literal["adapter"] = "adapter"
    variant: Literal["houlsby", "pfeiffer"] = "houlsby"
    bottleneck_size: int = 64
    non_linearity: str = "relu"

    FIELD_CHECKS: ClassVar[dict[str, Checker]] = {
        "variant": one_of(*ADAPTER_VARIANTS),
        "bottleneck_size": bottleneck_width,
        "non_linearity": one_of(*ADAPTER_ACTIVATIONS),
    }

    def cross_field_errors(self) -> list[tuple[str, str]]:
        return []


@dataclass(frozen=True)
class BiasSpec:
    """Bias tuning: a learned per-task bias delta on the outputs of `target_modules`."""

    method: Literal["bias"] = "bias"
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    FIELD_CHECKS: ClassVar[dict[str, Checker]] = {"target_modules": identifier_list}

    def cross_field_errors(self) -> list[tuple[str, str]]:
        return []


PeftSpec = Union[LoraSpec, IA3Spec, PrefixTuningSpec, PromptTuningSpec, AdapterSpec, BiasSpec]
"""One task's PEFT method and configuration: a union tagged by `method`."""

PEFT_SPECS: Mapping[str, type] = {
    cls.__dataclass_fields__["method"].default: cls
    for cls in (LoraSpec, IA3Spec, PrefixTuningSpec, PromptTuningSpec, AdapterSpec, BiasSpec)
}
PEFT_METHODS: tuple[str, ...] = tuple(PEFT_SPECS)


def spec_fields(cls: type) -> tuple[str, ...]:
    """The user-facing field names of a method's config class (`method` first)."""
    return tuple(f.name for f in dataclasses.fields(cls))


def read_peft(raw: Any, path: str, errors: list[str], *, require_all: bool = False) -> Any:
    """Check one task's `peft` mapping: its `method` (default `lora`) picks the config class,
    whose fields are checked under their paths (``tasks[2].peft.num_virtual_tokens``).

    Returns the config, or `INVALID` with the errors in ``errors``. ``require_all`` turns the
    defaults off (plans store fully resolved configs)."""
    if not isinstance(raw, Mapping):
        MappingReader(raw, path, errors, ())
        return INVALID
    probe = MappingReader({"method": raw["method"]} if "method" in raw else {}, path, errors, ("method",))
    method = probe.get("method", one_of(*PEFT_METHODS, what="PEFT method"), MISSING if require_all else "lora")
    if method is INVALID:
        return INVALID
    cls = PEFT_SPECS[method]
    reader = MappingReader(raw, path, errors, spec_fields(cls), f"{method} mapping")
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name == "method":
            continue
        default = MISSING if require_all else field.default
        values[field.name] = reader.get(field.name, cls.FIELD_CHECKS[field.name], default)
    if any(value is INVALID for value in values.values()):
        return INVALID
    config = cls(**values)
    for name, message in config.cross_field_errors():
        add_error(errors, join(path, name), message)
    return config
