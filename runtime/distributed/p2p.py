"""Pipeline sends and receives between stages: a micro-batch's activations forward, their
gradients back.

The values crossing the stage boundary after subgraph ``c`` are those produced by subgraphs
``<= c`` and read by later ones (the hidden state, and rotary tables made on the first stage);
graph inputs are not sent, since every rank lays out the micro-batches itself. An activation
message is a fixed-size header (per value: dtype, whether it needs a gradient, shape) and one
tensor per value; a gradient message is one tensor per value that needs a gradient, shaped
like the activation the receiver sent. Sends are asynchronous: their work handles are kept
until `drain` (end of round), so a rank computes the next micro-batch, of this hTask or
another, while its last activation travels. Each message has its own tag.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from muxtune.plans import Partition, Recv, Send

from ..execution.interpreter import MicroBatchBuffers
from ..run_folder import RunError
from .world import CommunicationError, World, first_line

HEADER_SLOTS = 64
MAX_DIMS = 4
_SLOTS_PER_VALUE = 3 + MAX_DIMS
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool)


def crossing_values(partition: Partition, cut: int) -> tuple[str, ...]:
    """The values produced by subgraphs ``<= cut`` that later subgraphs (or the graph output)
    read, in the order they are produced."""
    read_later = {name for sub in partition.subgraphs if sub.id > cut for name in sub.inputs}
    read_later.update(partition.outputs)
    produced = [name for sub in partition.subgraphs if sub.id <= cut for name in sub.outputs]
    return tuple(name for name in produced if name in read_later)


@dataclass(frozen=True)
class ValueMeta:
    dtype: torch.dtype
    requires_grad: bool
    shape: tuple[int, ...]


def encode_header(values: list[torch.Tensor]) -> torch.Tensor:
    """The header of an activation message: count, then per value dtype, grad flag, rank, dims."""
    if len(values) * _SLOTS_PER_VALUE + 1 > HEADER_SLOTS:
        raise RunError(f"a stage boundary carries {len(values)} values; the message header holds fewer")
    header = torch.zeros(HEADER_SLOTS, dtype=torch.int64)
    header[0] = len(values)
    for i, value in enumerate(values):
        if value.dim() > MAX_DIMS:
            raise RunError(f"a stage boundary value has {value.dim()} dimensions; at most {MAX_DIMS} are sent")
        base = 1 + i * _SLOTS_PER_VALUE
        header[base] = DTYPES.index(value.dtype)
        header[base + 1] = int(value.requires_grad)
        header[base + 2] = value.dim()
        header[base + 3 : base + 3 + value.dim()] = torch.tensor(value.shape)
    return header


def decode_header(header: torch.Tensor) -> list[ValueMeta]:
    out = []
    numbers = header.tolist()
    for i in range(numbers[0]):
        base = 1 + i * _SLOTS_PER_VALUE
        ndim = numbers[base + 2]
        out.append(
            ValueMeta(DTYPES[numbers[base]], bool(numbers[base + 1]), tuple(numbers[base + 3 : base + 3 + ndim]))
        )
    return out


def message_tag(ins: Send | Recv, index: int) -> int:
    """A tag unique to the message's micro-batch, direction and part (0: header)."""
    return (((ins.htask << 16) | ins.microbatch) << 8 | int(ins.grad) << 7 | index) & 0x7FFFFFFF


class StageExchange:
    """The `Send` and `Recv` handlers of one rank, on the interpreter's micro-batch buffers."""

    def __init__(self, partition: Partition, world: World, buffers: dict[tuple[int, int], MicroBatchBuffers]):
        self.partition = partition
        self.world = world
        self.buffers = buffers
        self._crossing: dict[int, tuple[str, ...]] = {}
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []

    def crossing(self, cut: int) -> tuple[str, ...]:
        if cut not in self._crossing:
            self._crossing[cut] = crossing_values(self.partition, cut)
        return self._crossing[cut]

    def _isend(self, tensor: torch.Tensor, ins: Send, index: int) -> None:
        tensor = tensor.detach().to(self.world.device).contiguous()
        with self.world.exchanging(f"sending hTask {ins.htask} micro-batch {ins.microbatch} to rank {ins.peer}"):
            self._pending.append((dist.isend(tensor, ins.peer, tag=message_tag(ins, index)), tensor))

    def _recv(self, tensor: torch.Tensor, ins: Recv, index: int, what: str) -> torch.Tensor:
        try:
            dist.irecv(tensor, ins.peer, tag=message_tag(ins, index)).wait()
        except RuntimeError as exc:
            raise CommunicationError(
                f"rank {self.world.rank}: lost rank {ins.peer} while receiving {what} of hTask {ins.htask} "
                f"micro-batch {ins.microbatch} (it stopped, or sent nothing for "
                f"{self.world.comm_timeout.total_seconds():.0f} s): {first_line(exc)}"
            ) from None
        return tensor

    def send(self, ins: Send) -> None:
        buffers = self.buffers[(ins.htask, ins.microbatch)]
        if buffers.empty:
            return
        names = self.crossing(ins.subgraph)
        if not ins.grad:
            values = [buffers.values[name] for name in names]
            self._isend(encode_header(values), ins, 0)
            for index, value in enumerate(values, start=1):
                self._isend(value, ins, index)
            return
        for index, name in enumerate(names, start=1):
            value = buffers.values[name]
            if value.requires_grad:
                grad = buffers.grads.get(name)
                self._isend(grad if grad is not None else torch.zeros_like(value), ins, index)

    def recv(self, ins: Recv) -> None:
        buffers = self.buffers[(ins.htask, ins.microbatch)]
        if buffers.empty:
            return
        names = self.crossing(ins.subgraph)
        device = self.world.device
        if not ins.grad:
            header = self._recv(torch.empty(HEADER_SLOTS, dtype=torch.int64, device=device), ins, 0, "activations")
            metas = decode_header(header.cpu())
            if len(metas) != len(names):
                raise RunError(
                    f"rank {ins.peer} sent {len(metas)} values across the stage boundary; expected {len(names)}"
                )
            for index, (name, meta) in enumerate(zip(names, metas), start=1):
                value = self._recv(torch.empty(meta.shape, dtype=meta.dtype, device=device), ins, index, "activations")
                buffers.values[name] = value.requires_grad_(meta.requires_grad)
            return
        for index, name in enumerate(names, start=1):
            value = buffers.values[name]
            if not value.requires_grad:
                continue
            grad = self._recv(torch.empty_like(value), ins, index, "gradients")
            previous = buffers.grads.get(name)
            buffers.grads[name] = grad if previous is None else previous + grad

    def drain(self) -> None:
        """Wait until every send issued so far has left."""
        pending, self._pending = self._pending, []
        for work, _ in pending:
            try:
                work.wait()
            except RuntimeError as exc:
                raise CommunicationError(
                    f"rank {self.world.rank}: a send did not complete: {first_line(exc)}"
                ) from None
