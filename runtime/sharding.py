"""How a task's PEFT state is spread over ranks: tensor-parallel shards (which slice of a full
tensor a rank holds, and how the state moves between its per-rank parts and its single-process
form), modules every pipeline stage uses, and megatron-core's tensor-parallel group.

A backbone built with a `TensorSplit` has *column*-parallel linear hosts (output features split:
q/k/v, gate/up) and *row*-parallel ones (input features split: o/down; a collective sums their
partial outputs). A task's PEFT module at such a host is built at full size and initialized, so
its values are the single-process run's, then cut (`shard_modules`). Each of its parameters is
then either split along one dimension, or replicated with *partial* gradients (every shard adds
a part; their sum over the tensor-parallel group is the gradient). Parameters of modules at
hosts that are not split (the head, the embeddings) are plain replicas: equal gradients on
every shard.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.nn.functional
from torch import nn

ShardStyle = Literal["column", "row", "heads"]
"""Column: output features split; row: input features split; heads: an attention host's heads
split (its `HostShard` features are the full query and key/value widths)."""


@dataclass(frozen=True)
class TensorSplit:
    """Shard ``index`` of ``size`` equal, contiguous parts."""

    size: int
    index: int

    def length(self, full: int) -> int:
        """The part of ``full`` one shard holds (ValueError when it does not split evenly)."""
        if full % self.size:
            raise ValueError(f"a size of {full} does not split into {self.size} equal parts")
        return full // self.size

    def take(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This shard's slice of ``tensor`` along ``dim`` (a view)."""
        part = self.length(tensor.shape[dim])
        return tensor.narrow(dim, self.index * part, part)


@dataclass(frozen=True)
class HostShard:
    """How a linear host is split, and its full (unsplit) feature counts."""

    style: ShardStyle
    split: TensorSplit
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ParameterShard:
    """A PEFT parameter's part: split along ``dim``, or (``dim`` None) replicated with partial
    gradients."""

    split: TensorSplit
    dim: int | None


_SHARD = "muxtune_shard"


@functools.cache
def megatron(module: str) -> ModuleType:
    """A megatron-core module (``megatron.core.<module>``), imported on first use: the import
    takes seconds and warns that Transformer Engine and Apex are absent, which the CPU path
    never needs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(f"megatron.core.{module}")


def _tensor_group() -> dist.ProcessGroup:
    return megatron("parallel_state").get_tensor_model_parallel_group()


def sum_over_shards(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over megatron-core's tensor-parallel group, outside autograd (a
    small reduction a PEFT module needs inside its forward, such as DoRA's weight norms)."""
    dist.all_reduce(tensor, group=_tensor_group())
    return tensor


def summed_over_shards(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the tensor-parallel group, as a differentiable op: its backward
    sums the gradients over the group too (what a PEFT module that needs a row-parallel host's
    whole output computes it with)."""
    return torch.distributed.nn.functional.all_reduce(tensor, group=_tensor_group())


def host_shard(host: nn.Module) -> HostShard | None:
    """The host's split, None for a host every rank holds whole."""
    return getattr(host, "tensor_shard", None)


def full_features(host: nn.Module) -> tuple[int, int]:
    """A linear host's (in, out) features as in the unsplit model: what its PEFT modules are built for."""
    shard = host_shard(host)
    return (shard.in_features, shard.out_features) if shard is not None else (host.in_features, host.out_features)


def parameter_shard(param: torch.Tensor) -> ParameterShard | None:
    """How a PEFT parameter is split (None: a plain replica, or no tensor parallelism)."""
    return getattr(param, _SHARD, None)


def anchor_shard(model: nn.Module, anchor: str) -> HostShard | None:
    """The split of the host at ``anchor`` (a module path; None for a path that names no module,
    such as prompt tuning's own anchor name)."""
    try:
        return host_shard(model.get_submodule(anchor))
    except AttributeError:
        return None


def split_problem(module: nn.Module, shard: HostShard | None) -> str | None:
    """Why ``module`` cannot run at a host split as ``shard`` says, or None."""
    if shard is None:
        return None
    dims = getattr(module, "shard_dims", lambda style: None)(shard.style)
    if dims is None:
        return f"{type(module).__name__} has no tensor-parallel form at a {shard.style}-parallel operator"
    return None


def shard_modules(modules: Mapping[str, nn.Module], model: nn.Module) -> None:
    """Cut each full-size module at a split host of ``model`` (anchors are module paths) to
    this rank's part, as its `shard_dims(style)` says; its parameters are replaced by new ones."""
    for anchor, module in modules.items():
        shard = anchor_shard(model, anchor)
        if shard is None:
            continue
        problem = split_problem(module, shard)
        assert problem is None, f"{anchor}: {problem} (the compiler refuses such plans)"
        for name, dim in module.shard_dims(shard.style).items():
            owner_path, _, attribute = name.rpartition(".")
            owner = module.get_submodule(owner_path)
            full = getattr(owner, attribute)
            value = full.detach() if dim is None else shard.split.take(full.detach(), dim).clone()
            param = nn.Parameter(value, requires_grad=full.requires_grad)
            setattr(param, _SHARD, ParameterShard(shard.split, dim))
            setattr(owner, attribute, param)


def mark_partial(module: nn.Module, split: TensorSplit) -> None:
    """Tag every parameter of ``module`` as whole on every shard of ``split``'s group, with
    partial gradients (for a module every shard uses a different part of)."""
    for param in module.parameters():
        setattr(param, _SHARD, ParameterShard(split, None))


_EVERY_STAGE = "muxtune_every_stage"


def mark_every_stage(module: nn.Module) -> None:
    """Tag every parameter of ``module`` as used by every decoder layer (prefix tuning's encoder):
    each pipeline stage holds it whole and adds a part of its gradient."""
    for param in module.parameters():
        setattr(param, _EVERY_STAGE, True)


def used_on_every_stage(param: torch.Tensor) -> bool:
    """Whether every pipeline stage adds a part of ``param``'s gradient (see `mark_every_stage`)."""
    return getattr(param, _EVERY_STAGE, False)


def local_part(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value``, a tensor of ``param``'s single-process shape (the parameter or one of its
    optimizer moments), cut to this rank's part; scalars and unsplit parameters pass through."""
    shard = parameter_shard(param)
    if shard is None or shard.dim is None or value.dim() == 0:
        return value
    return shard.split.take(value, shard.dim)


def local_optimizer_state(state_dict: dict[str, Any], params: list[torch.Tensor]) -> dict[str, Any]:
    """A single-process optimizer state dict (parameters by index, in ``params`` order) cut to
    this rank's parts."""
    state = {
        index: {
            key: local_part(params[index], value) if torch.is_tensor(value) else value for key, value in entry.items()
        }
        for index, entry in state_dict["state"].items()
    }
    return {**state_dict, "state": state}


def joined(parts: list[tuple[int, Any]], dim: int) -> Any:
    """The single-process value of a split tensor (or optimizer entry) from its (shard index,
    part) pairs: tensors concatenated along ``dim`` in shard order, scalars from shard 0."""
    ordered = [part for _, part in sorted(parts, key=lambda pair: pair[0])]
    first = ordered[0]
    if isinstance(first, dict):
        return {key: joined([(i, part[key]) for i, part in enumerate(ordered)], dim) for key in first}
    if torch.is_tensor(first) and first.dim() > 0:
        return torch.cat(ordered, dim=dim)
    return first
