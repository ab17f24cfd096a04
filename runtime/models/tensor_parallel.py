"""Tensor parallelism of the backbone: the collectives around split layers, and which part of each
checkpoint tensor a rank reads.

Megatron's layout: in each decoder layer, attention heads and the MLP's intermediate features are
split over the tensor-parallel group. The input of the column-parallel operators (q/k/v,
gate/up) enters the group through `enter_tensor_parallel` (megatron-core's
``copy_to_tensor_model_parallel_region``: identity forward, gradient summed over the group in
backward); the partial outputs of the row-parallel operators (o/down) leave it through
`leave_tensor_parallel` (``reduce_from_tensor_model_parallel_region``: summed forward, identity
backward). Both are graph nodes of their own, so the partition makes each a collective
subgraph the plan schedules like any other. The process group is megatron-core's
``parallel_state`` tensor-parallel group (see `distributed.world`).

The split layers are the backbone's own shard-sized hosts rather than megatron's
``ColumnParallelLinear``/``RowParallelLinear``: those run their collective inside the layer (out
of the plan's reach, and before a PEFT module could add its partial output) and compute a
weight gradient for the frozen weight in every backward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..execution.subgraphs import collective
from ..sharding import HostShard, TensorSplit, anchor_shard, megatron


@collective
def enter_tensor_parallel(x_TC: Tensor) -> Tensor:
    """The replicated input of column-parallel operators: identity, its gradient summed over the
    tensor-parallel group."""
    return megatron("tensor_parallel.mappings").copy_to_tensor_model_parallel_region(x_TC)


@collective
def leave_tensor_parallel(x_TC: Tensor) -> Tensor:
    """The sum over the tensor-parallel group of row-parallel operators' partial outputs."""
    return megatron("tensor_parallel.mappings").reduce_from_tensor_model_parallel_region(x_TC)


def check_split(what: str, widths: dict[str, int], split: TensorSplit) -> None:
    """ValueError naming the first width of ``what`` that does not divide into ``split.size`` parts."""
    for name, width in widths.items():
        if width % split.size:
            raise ValueError(f"{what}: {name}={width} does not split over tensor_parallel={split.size} ranks")


def split_linear(host: nn.Module, style: str, split: TensorSplit | None) -> nn.Module:
    """Mark a host built at shard size as ``style``-parallel (a no-op without a split)."""
    if split is not None:
        full_in = host.in_features * (split.size if style == "row" else 1)
        full_out = host.out_features * (split.size if style == "column" else 1)
        host.tensor_shard = HostShard(style, split, full_in, full_out)
    return host


def _owner(model: nn.Module, key: str) -> tuple[HostShard | None, str]:
    """The split of the module holding the state key ``key``, and the tensor's own name."""
    path, _, name = key.rpartition(".")
    return anchor_shard(model, path), name


def _split_dim(shard: HostShard | None, name: str, shape: tuple[int, ...]) -> int | None:
    """The dimension of a host's tensor that is split (None: held whole, or a shape that does
    not split, which the checkpoint check then reports)."""
    if shard is None or shard.style == "heads" or (shard.style == "row" and name == "bias"):
        return None
    dim = 0 if shard.style == "column" else 1
    return dim if dim < len(shape) and shape[dim] % shard.split.size == 0 else None


def local_shape(model: nn.Module, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape this rank holds of the checkpoint tensor ``key`` (a model state key) of ``shape``."""
    shard, name = _owner(model, key)
    dim = _split_dim(shard, name, shape)
    if dim is None:
        return shape
    return tuple(shard.split.length(n) if i == dim else n for i, n in enumerate(shape))


def read_part(model: nn.Module, key: str, tensor_slice: object) -> Tensor:
    """This rank's part of the checkpoint tensor ``key`` (a model state key), read from a
    safetensors slice: rows of column-parallel weights and biases, columns of row-parallel
    weights; a row-parallel bias on shard 0 only (zeros elsewhere: the partial outputs are summed)."""
    shard, name = _owner(model, key)
    shape = tuple(tensor_slice.get_shape())
    dim = _split_dim(shard, name, shape)
    if dim is None:
        full = tensor_slice[:]
        row_bias = shard is not None and shard.style == "row" and name == "bias"
        return torch.zeros_like(full) if row_bias and shard.split.index != 0 else full
    part = shard.split.length(shape[dim])
    start = shard.split.index * part
    if dim == 0:
        return tensor_slice[start : start + part]
    return tensor_slice[:, start : start + part]
