"""Per-task reductions across ranks: data-parallel gradient sums, partial gradients summed over
tensor-parallel shards and over pipeline stages, the optimizer step's loss, token counts,
gradient norm and divergence decision, and a task's state gathered on rank 0.

A rank holds the PEFT modules of every anchor (they are small), but only the anchors its
stage runs ("owned" anchors) ever get gradients or change; the others keep their initial
values. A module every stage uses (prefix tuning's encoder) is trained on every stage, each
adding its layers' part of the gradient. Rank 0 assembles a task's state from the owners
(replica 0; each tensor-parallel shard's part), so checkpoints and adapters have the
single-process format: a job can resume on another mesh.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..engine import MultiTaskEngine, StepResult, TaskState
from ..sharding import joined, parameter_shard, used_on_every_stage
from .world import World

BUCKET_ELEMENTS = 1 << 22
"""Gradients are all-reduced in flat fp32 buckets of at most this many elements (16 MiB)."""


def owned_parameters(state: TaskState, owned: Collection[str]) -> list[tuple[str, nn.Parameter]]:
    """The task's parameters this rank trains, keyed ``<anchor>.<param>``, in module order: those
    at the ``owned`` anchors, and those every pipeline stage uses (`used_on_every_stage`)."""
    return [
        (f"{anchor}.{name}", p)
        for anchor, module in state.modules.items()
        for name, p in module.named_parameters()
        if anchor in owned or used_on_every_stage(p)
    ]


def _buckets(params: Sequence[nn.Parameter]) -> list[list[nn.Parameter]]:
    buckets: list[list[nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if buckets[-1] and size + p.numel() + 1 > BUCKET_ELEMENTS:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel() + 1
    return [b for b in buckets if b]


def all_reduce_gradients(
    params: Sequence[nn.Parameter],
    group: dist.ProcessGroup,
    world: World,
    what: str = "summing gradients over the data-parallel replicas",
) -> None:
    """Sum the parameters' gradients over the ranks of ``group`` (data-parallel replicas, or
    tensor-parallel shards for partial gradients): flat fp32 buckets, all issued before any is
    waited on. A rank without a gradient adds zeros; a parameter that no rank has a gradient
    for keeps none (as in a single process)."""
    device = world.device
    pending = []
    for bucket in _buckets(params):
        flat = torch.cat(
            [
                torch.cat(
                    [
                        (p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
                        .reshape(-1)
                        .to(device),
                        torch.ones(1, device=device) if p.grad is not None else torch.zeros(1, device=device),
                    ]
                )
                for p in bucket
            ]
        )
        with world.exchanging(what):
            pending.append((bucket, flat, dist.all_reduce(flat, group=group, async_op=True)))
    for bucket, flat, work in pending:
        with world.exchanging(what):
            work.wait()
        offset = 0
        for p in bucket:
            values = flat[offset : offset + p.numel()]
            present = bool(flat[offset + p.numel()] > 0)
            offset += p.numel() + 1
            p.grad = values.view_as(p).to(dtype=p.dtype, device=p.device) if present else None


def optimizer_steps(engine: MultiTaskEngine, names: Sequence[str], world: World) -> list[StepResult]:
    """One optimizer step for each task in ``names`` on every rank at once: partial gradients
    summed over the tensor-parallel shards and the pipeline stages, then the loss, token counts and squared gradient
    norm reduced over the world in one call, the same clipping and divergence decision
    everywhere (one more call for parameters made non-finite)."""
    states = [engine.tasks[name] for name in names]
    partial_sums = (
        (world.tensor_group, is_partial, "summing partial gradients over the tensor-parallel shards"),
        (world.stage_group, used_on_every_stage, "summing gradients of modules every stage uses"),
    )
    for group, partial, what in partial_sums:
        if group is not None:
            all_reduce_gradients([p for state in states for p in state.parameters if partial(p)], group, world, what)
    figures = torch.zeros(len(states), 4, dtype=torch.float64)
    for i, state in enumerate(states):
        if world.counts_loss:
            pending = (float(state.pending_loss), state.pending_target_tokens, state.pending_tokens)
            figures[i, :3] = torch.tensor(pending)
        grads = [p.grad for p in state.parameters if p.grad is not None and world.counts_gradient(p)]
        if grads:
            figures[i, 3] = float(torch.nn.utils.get_total_norm(grads)) ** 2
    world.all_reduce(figures)
    applied = []
    nonfinite = torch.zeros(len(states), dtype=torch.float64)
    for i, (name, state) in enumerate(zip(names, states)):
        loss = float(figures[i, 0]) / max(1, state.normalizer)
        grad_norm = math.sqrt(float(figures[i, 3])) if math.isfinite(float(figures[i, 3])) else math.inf
        if math.isfinite(grad_norm):
            torch.nn.utils.clip_grads_with_norm_(state.parameters, state.config.max_grad_norm, torch.tensor(grad_norm))
        lr, stepped = engine.apply_update(name, loss, grad_norm)
        nonfinite[i] = float(stepped and not engine.parameters_finite(name))
        applied.append((loss, lr, grad_norm, stepped))
    world.all_reduce(nonfinite, dist.ReduceOp.MAX)
    return [
        engine.finish_step(
            name, loss, lr, grad_norm, not stepped or bool(nonfinite[i]), int(figures[i, 1]), int(figures[i, 2])
        )
        for i, (name, (loss, lr, grad_norm, stepped)) in enumerate(zip(names, applied))
    ]


def gather_task_state(
    state: TaskState, owned: Collection[str], world: World, *, with_optimizer: bool
) -> tuple[dict[str, torch.Tensor], dict] | None:
    """On rank 0: the task's whole adapter state (``<anchor>.<param>`` -> tensor, each from its
    owner) and, ``with_optimizer``, its whole optimizer state dict, both in the single-process
    form; None on the other ranks. Only ranks whose parts are exported (`World.exports`) send
    theirs: every tensor-parallel shard its part of a split parameter (joined here), shard 0
    what every shard holds whole."""
    keys = [f"{anchor}.{name}" for anchor, module in state.modules.items() for name, _ in module.named_parameters()]
    index_of = {key: i for i, key in enumerate(keys)}
    tp_index = world.position.tp_index
    part: dict[str, tuple[int, int, torch.Tensor, dict | None]] = {}
    if world.exports:
        optimizer_state = state.optimizer.state_dict()["state"] if with_optimizer else {}
        for key, p in owned_parameters(state, owned):
            shard = parameter_shard(p)
            dim = shard.dim if shard is not None else None
            if (dim is None and tp_index != 0) or (used_on_every_stage(p) and world.position.stage != 0):
                continue
            part[key] = (tp_index, dim or 0, p.detach().cpu().clone(), optimizer_state.get(index_of[key]))
    parts: list[dict | None] = [None] * world.size if world.lead else []
    with world.exchanging(f"gathering task {state.config.name}'s state on rank 0"):
        dist.gather_object(part, parts if world.lead else None, dst=0)
    if not world.lead:
        return None
    adapter = state.adapter_state()
    optimizer = state.optimizer.state_dict() if with_optimizer else {}
    if with_optimizer:
        optimizer["state"] = dict(optimizer["state"])
    pieces: dict[str, list[tuple[int, int, torch.Tensor, dict | None]]] = {}
    for received in parts:
        for key, piece in (received or {}).items():
            pieces.setdefault(key, []).append(piece)
    for key, shards in pieces.items():
        dim = shards[0][1]
        adapter[key] = joined([(index, tensor) for index, _, tensor, _ in shards], dim)
        if with_optimizer and all(entry is not None for *_, entry in shards):
            optimizer["state"][index_of[key]] = joined([(index, entry) for index, _, _, entry in shards], dim)
    if with_optimizer:
        optimizer["state"] = dict(sorted(optimizer["state"].items()))
    return adapter, optimizer


def is_partial(param: torch.Tensor) -> bool:
    """A parameter every tensor-parallel shard holds whole, each adding a part of its gradient."""
    shard = parameter_shard(param)
    return shard is not None and shard.dim is None


def gather_peak_memory(peak_bytes: int, world: World) -> list[int]:
    """Every rank's peak memory, on every rank."""
    peaks = torch.zeros(world.size, dtype=torch.float64)
    peaks[world.rank] = peak_bytes
    world.all_reduce(peaks)
    return [int(v) for v in peaks.tolist()]


def owned_anchors(anchors: Collection[str], layer_prefix: str, layers: range, first: bool, last: bool) -> set[str]:
    """The anchors a pipeline stage holding decoder ``layers`` runs: those inside its layers,
    the head's (``lm_head``) on the last stage, and the other anchors outside the decoder
    layers (embeddings, soft prompts) on the first."""
    owned = set()
    prefix = layer_prefix + "."
    for anchor in anchors:
        if anchor.startswith(prefix):
            inside = int(anchor[len(prefix) :].split(".", 1)[0]) in layers
        else:
            inside = last if anchor.split(".", 1)[0] == "lm_head" else first
        if inside:
            owned.add(anchor)
    return owned
