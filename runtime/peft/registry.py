"""The PEFT method registry: one `PeftMethod` entry per spec `method`.

An entry says how a method's config (a `muxtune.specs` dataclass) becomes modules attached to a
backbone, how its sequences enter a packed micro-batch, and how its trained state is written to
and read from an adapter directory. The engine, the compiler and the adapter files only go
through this table, so adding a method is one module plus one line in `METHODS`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from muxtune.common.errors import UserError
from muxtune.specs import PeftSpec

from .base import OperatorHost, OperatorPeftModule, PeftHost

if TYPE_CHECKING:  # the backbone modules import this package
    from ..data import Example
    from ..models.config import BackboneConfig

PEFT_PREFIX = "base_model.model."
"""Prefix of peft's saved keys for a causal LM (`base_model.model.<module path>.<param>`)."""


class AdapterError(UserError):
    """An adapter directory that cannot be used, naming the file and what is wrong."""


class PeftAttachError(ValueError):
    """A task's PEFT config that does not fit the backbone; `field` names the config field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class AttachContext:
    """What attaching one task's modules may use."""

    model: nn.Module
    task: str
    generator: torch.Generator  # initialization, seeded with the task seed only
    dropout_generator: torch.Generator  # the task's own dropout stream
    dtype: torch.dtype
    encode: Callable[[str], list[int]] | None = None  # the job's tokenizer, for text initializations

    @functools.cached_property
    def device(self) -> torch.device:
        """Where the trainable parameters live: the backbone's device (CPU for a meta backbone)."""
        device = next(self.model.parameters()).device
        return torch.device("cpu") if device.type == "meta" else device


@dataclass(frozen=True)
class ExportContext:
    """What writing an adapter directory may use: the base model's name for
    `base_model_name_or_path`, and its configuration."""

    base_model: str
    backbone: BackboneConfig

    @property
    def fan_in_fan_out(self) -> bool:
        """peft's flag for GPT-2's transposed Conv1D weights."""
        return self.backbone.family == "gpt2"


AdapterFiles = tuple[dict[str, Any], dict[str, torch.Tensor]]
"""An adapter directory's contents: adapter_config.json as a dict, and the saved tensors."""


def unchanged_example(_: Any, example: Example) -> Example:
    """Sequences of most methods enter the micro-batch as they are."""
    return example


@dataclass(frozen=True)
class PeftMethod:
    """A PEFT method: its spec config class and how the runtime builds, feeds and saves it.

    `attach(spec, ctx)` attaches fresh, initialized modules for `ctx.task` and returns them by
    anchor name (their parameters, keyed `<anchor>.<param>`, are the task's trainable state).
    `prepare_example` changes how each of the task's sequences is laid out in a micro-batch
    (virtual tokens, shifted positions). `export(spec, state, ctx)` gives the adapter directory's
    config and tensors; `load(raw_config, tensors, path)` reads one back into (spec, state).
    `peft_types` are the `peft_type` values of adapter_config.json this method reads.
    """

    name: str
    spec_type: type
    peft_types: tuple[str, ...]
    attach: Callable[[Any, AttachContext], dict[str, nn.Module]]
    export: Callable[[Any, Mapping[str, torch.Tensor], ExportContext], AdapterFiles]
    load: Callable[[dict[str, Any], dict[str, torch.Tensor], Path], tuple[Any, dict[str, torch.Tensor]]]
    prepare_example: Callable[[Any, Example], Example] = unchanged_example


def matches_target(name: str, target_modules: tuple[str, ...]) -> bool:
    """peft's rule for a list of targets: the full name, or a dotted suffix of it."""
    return name in target_modules or any(name.endswith("." + t) for t in target_modules)


def find_anchors(model: nn.Module, target_modules: tuple[str, ...]) -> list[str]:
    """Names of the operator hosts selected by `target_modules`, in model order."""
    return [
        name
        for name, module in backbone_modules(model)
        if isinstance(module, OperatorHost) and matches_target(name, target_modules)
    ]


def backbone_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """`named_modules()` without the PEFT modules attached to hosts (their `adapters`), which
    with many tasks attached far outnumber the backbone's."""
    for name, child in module._modules.items():
        if child is None or (name == "adapters" and isinstance(module, PeftHost)):
            continue
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        yield from backbone_modules(child, path)


def attach_operator_modules(
    ctx: AttachContext,
    anchors: list[str],
    build: Callable[[str, nn.Module], OperatorPeftModule],
) -> dict[str, nn.Module]:
    """Build (`build(anchor name, host)`), initialize and attach one module per anchor, in model
    order, each drawing its initialization from the task's generator in turn."""
    modules: dict[str, nn.Module] = {}
    for name in anchors:
        host = ctx.model.get_submodule(name)
        module = build(name, host)
        module.reset_parameters(ctx.generator)
        module.set_dropout_generator(ctx.dropout_generator)
        host.add_adapter(ctx.task, module)
        modules[name] = module
    return modules


def targeted_anchors(model: nn.Module, target_modules: tuple[str, ...], field: str = "target_modules") -> list[str]:
    """`find_anchors`, raising `PeftAttachError` naming `field` when nothing matches."""
    anchors = find_anchors(model, target_modules)
    if not anchors:
        names = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, OperatorHost)})
        raise PeftAttachError(
            field, f"{list(target_modules)} match no linear operator of the model; it has: {', '.join(names)}"
        )
    return anchors


def prefixed_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State keyed `<anchor>.<param>` as peft's saved keys."""
    return {PEFT_PREFIX + key: value.detach().to("cpu") for key, value in state.items()}


def unprefixed_state(tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """peft's saved keys back to `<anchor>.<param>` (an adapter name in a key is dropped)."""
    state = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{path}: tensor {key!r} does not start with {PEFT_PREFIX!r}")
        state[key[len(PEFT_PREFIX) :].replace(".default.", ".")] = value
    return state


def config_field(raw: Mapping[str, Any], key: str, path: Path, check: Callable[[Any], bool], what: str) -> Any:
    """`raw[key]` when `check` accepts it, else an AdapterError naming the file and field."""
    value = raw.get(key)
    if not check(value):
        raise AdapterError(f"{path}: {key} must be {what}, got {value!r}")
    return value


def positive_int_field(raw: Mapping[str, Any], key: str, path: Path) -> int:
    """A positive integer field of an adapter config."""
    return config_field(
        raw, key, path, lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"
    )


def positive_number_field(raw: Mapping[str, Any], key: str, path: Path) -> float:
    """A positive number field of an adapter config."""
    return config_field(
        raw, key, path, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a positive number"
    )


def module_list(raw: Mapping[str, Any], key: str, path: Path, *, allow_empty: bool = False) -> tuple[str, ...]:
    """A list of module names from an adapter config, sorted."""
    value = config_field(
        raw,
        key,
        path,
        lambda v: isinstance(v, list) and (allow_empty or bool(v)) and all(isinstance(n, str) for n in v),
        "a list of module names" if allow_empty else "a non-empty list of module names",
    )
    return tuple(sorted(value))


def _methods() -> dict[str, PeftMethod]:
    from .bias import BIAS
    from .bottleneck import ADAPTER
    from .ia3 import IA3
    from .lora import LORA
    from .prompt_learning import PREFIX_TUNING, PROMPT_TUNING

    return {method.name: method for method in (LORA, ADAPTER, BIAS, IA3, PREFIX_TUNING, PROMPT_TUNING)}


METHODS: dict[str, PeftMethod] = _methods()


def method_of(spec: PeftSpec) -> PeftMethod:
    """The registry entry of a task's PEFT config."""
    return METHODS[spec.method]


def method_for_peft_type(peft_type: Any, path: Path) -> PeftMethod:
    """The registry entry that reads adapter directories of `peft_type`."""
    for method in METHODS.values():
        if peft_type in method.peft_types:
            return method
    known = sorted(t for m in METHODS.values() for t in m.peft_types)
    raise AdapterError(f"{path}: peft_type {peft_type!r} is not supported (supported: {', '.join(known)})")


def prepare_examples(spec: PeftSpec, examples: list[Example]) -> list[Example]:
    """A task's sequences as they enter its micro-batches (see `PeftMethod.prepare_example`)."""
    prepare = method_of(spec).prepare_example
    return [prepare(spec, example) for example in examples]
