"""This rank's place in a multi-rank plan, and its process groups.

One process per rank, started by `muxtune-run` (through torch's elastic launcher) or by
`torchrun`; both set ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. The
backend is gloo on CPU and NCCL on CUDA. Every blocking exchange gives up after
``MUXTUNE_COMM_TIMEOUT`` seconds (default 20; raise it for pipelines whose stages compute longer
than that between two messages). A rank that hangs then stops the job within a minute: the
timeout, plus the 30 s torch's launcher grants a stopping rank before it kills it. The
prologue, where ranks load the backbone and tokenize at their own pace, waits longer
(``MUXTUNE_START_TIMEOUT``, default 1800).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from muxtune.plans import Placement
from muxtune.plans.mesh import MeshPosition, position_of, rank_of

from ..run_folder import RunError
from ..sharding import megatron, parameter_shard, used_on_every_stage

COMM_TIMEOUT_ENV = "MUXTUNE_COMM_TIMEOUT"
START_TIMEOUT_ENV = "MUXTUNE_START_TIMEOUT"
DEFAULT_COMM_TIMEOUT_S = 20.0
DEFAULT_START_TIMEOUT_S = 1800.0


class CommunicationError(Exception):
    """An exchange with another rank failed or timed out; the message names the rank."""


def _seconds(name: str, default: float) -> timedelta:
    text = os.environ.get(name)
    if text is None:
        return timedelta(seconds=default)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise RunError(f"{name}: must be a positive number of seconds, got {text!r}")
    return timedelta(seconds=value)


@dataclass
class World:
    """This rank's mesh position and the groups it reduces over.

    ``data_groups`` maps each data-parallel replica group (the plan's `AllReduce.group`) to its
    process group; ``tensor_group`` is megatron-core's tensor-parallel group of this rank (None
    without tensor parallelism), ``stage_group`` the ranks of every pipeline stage with this
    rank's shard and replica (None with one stage). Per-task figures (loss, token counts, gradient norm,
    divergence) are reduced over the whole world, each rank adding only what it alone holds
    (see the properties and `counts_gradient`)."""

    rank: int
    size: int
    position: MeshPosition
    num_stages: int
    device: torch.device
    comm_timeout: timedelta
    data_groups: dict[tuple[int, ...], dist.ProcessGroup] = field(default_factory=dict)
    tensor_group: dist.ProcessGroup | None = None
    stage_group: dist.ProcessGroup | None = None

    @property
    def lead(self) -> bool:
        """Rank 0 owns the run folder: logs, checkpoints, adapters, summary."""
        return self.rank == 0

    @property
    def last_stage(self) -> bool:
        return self.position.stage == self.num_stages - 1

    @property
    def counts_loss(self) -> bool:
        """Whether this rank's loss and token figures count: the last stage computes the loss,
        each replica on its own share; tensor-parallel shards repeat it."""
        return self.last_stage and self.position.tp_index == 0

    @property
    def exports(self) -> bool:
        """Whether this rank's owned task parts are gathered on rank 0: replicas repeat what
        replica 0 holds (each tensor-parallel shard of it sends its parts, see
        `reductions.gather_task_state`)."""
        return self.position.replica == 0

    def counts_gradient(self, param: torch.Tensor) -> bool:
        """Whether this rank's gradient of ``param`` counts in a norm: replicas hold equal
        gradients after their all-reduce, so replica 0 speaks for them; of a tensor-parallel
        group, every shard for a split parameter, shard 0 for one every shard holds whole (its
        gradient is the same everywhere once summed); stage 0 for one every stage uses."""
        if self.position.replica != 0 or (used_on_every_stage(param) and self.position.stage != 0):
            return False
        shard = parameter_shard(param)
        return self.position.tp_index == 0 or (shard is not None and shard.dim is not None)

    @contextlib.contextmanager
    def exchanging(self, what: str) -> Iterator[None]:
        """Turn a failed or timed-out collective into a `CommunicationError` naming ``what``."""
        try:
            yield
        except RuntimeError as exc:
            raise CommunicationError(
                f"rank {self.rank}: {what} failed: another rank stopped, or was silent for "
                f"{self.comm_timeout.total_seconds():.0f} s: {first_line(exc)}"
            ) from None

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce ``tensor`` over every rank in place (moved to the backend's device and back)."""
        on_device = tensor.to(self.device)
        with self.exchanging("reducing per-task figures over all ranks"):
            dist.all_reduce(on_device, op=op)
        tensor.copy_(on_device)
        return tensor


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_world(placement: Placement, device: torch.device) -> World:
    """Join the job's process group from the launcher's environment and create the
    data-parallel groups (every rank creates every group, in one order)."""
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise RunError("RANK and WORLD_SIZE are not set: start ranks with muxtune-run or torchrun") from None
    if size != placement.num_ranks:
        raise RunError(
            f"the plan has {placement.num_ranks} ranks, the launcher started {size}: "
            f"use --nproc-per-node {placement.num_ranks} (or let muxtune-run start them)"
        )
    comm_timeout = _seconds(COMM_TIMEOUT_ENV, DEFAULT_COMM_TIMEOUT_S)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend_for(device), rank=rank, world_size=size, timeout=comm_timeout)
    world = World(rank, size, position_of(placement, rank), placement.pipeline_parallel, device, comm_timeout)
    for stage in range(placement.pipeline_parallel):
        for tp_index in range(placement.tensor_parallel):
            ranks = tuple(rank_of(placement, MeshPosition(stage, tp_index, r)) for r in range(placement.data_parallel))
            group = dist.new_group(list(ranks)) if len(ranks) > 1 else None
            if rank in ranks and group is not None:
                world.data_groups[ranks] = group
    if placement.pipeline_parallel > 1:
        for tp_index in range(placement.tensor_parallel):
            for replica in range(placement.data_parallel):
                ranks = [
                    rank_of(placement, MeshPosition(s, tp_index, replica)) for s in range(placement.pipeline_parallel)
                ]
                group = dist.new_group(ranks)
                if rank in ranks:
                    world.stage_group = group
    if placement.tensor_parallel > 1:
        world.tensor_group = megatron_tensor_group(placement, world)
    return world


def megatron_tensor_group(placement: Placement, world: World) -> dist.ProcessGroup:
    """megatron-core's ``parallel_state`` over the plan's mesh (its order ``tp-cp-ep-pp-dp`` is
    the plan's rank numbering; exchanges give up after the communication timeout); this rank's
    tensor-parallel group."""
    parallel_state = megatron("parallel_state")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=placement.tensor_parallel,
        pipeline_model_parallel_size=placement.pipeline_parallel,
        distributed_timeout_minutes=world.comm_timeout.total_seconds() / 60,
        order="tp-cp-ep-pp-dp",
    )
    group = parallel_state.get_tensor_model_parallel_group()
    position = world.position
    expected = [
        rank_of(placement, MeshPosition(position.stage, t, position.replica)) for t in range(placement.tensor_parallel)
    ]
    assert dist.get_process_group_ranks(group) == expected, "megatron's tensor-parallel group is not the plan's"
    return group


def wait_for_all(world: World, what: str) -> None:
    """A barrier with the start-up timeout that names the ranks that did not arrive."""
    timeout = _seconds(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S)
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
        else:
            dist.barrier()
    except RuntimeError as exc:
        raise CommunicationError(f"rank {world.rank}: {what}: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message (torch's distributed errors run long)."""
    text = str(exc).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(exc).__name__


def close_world(world: World, finished: bool) -> None:
    """Leave the process group; a rank that ``finished`` first waits for all others to finish
    too, so none tears its connections down under another's last exchange."""
    if not dist.is_initialized():
        return
    if finished:
        wait_for_all(world, "every rank finishes")
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
