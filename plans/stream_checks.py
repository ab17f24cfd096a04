"""Streams of one round body: each hTask runs on one stream, pipeline sends and receives only on
stream 0, every other stream starts its work only after waiting for an event of stream 0 (so
after the previous round's optimizer steps), and the instructions that act on every task
(all-reduce, optimizer step, checkpoint) run on stream 0 after every other stream's earlier work
has been joined to it through events; in a body of several rounds (``steps_on_own_streams``) a
task's optimizer step runs on its hTask's own stream instead (`body_checks` checks which).

This is what lets a runtime run each stream on its own (a CUDA stream, or a worker thread on the
CPU) and still replay the body correctly: no two streams touch the same hTask's buffers, and the
only cross-stream orderings are the events. Joins are tracked with one vector clock per stream
(the last body index of every stream known to be done before the stream's next instruction).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .instructions import (
    AllReduce,
    Checkpoint,
    Instruction,
    OptimizerStep,
    RecordEvent,
    Recv,
    Send,
    WaitEvent,
)

HOST_STREAM = 0
"""The stream of the instructions that name none."""

HOST_INSTRUCTIONS = (AllReduce, OptimizerStep, Checkpoint)


def stream_of(instruction: Instruction, htask_streams: dict[int, int]) -> int:
    """The stream ``instruction`` runs on: its own ``stream``, else its hTask's (a send or a
    receive), else stream 0."""
    stream = getattr(instruction, "stream", None)
    if stream is not None:
        return stream
    htask = getattr(instruction, "htask", None)
    return htask_streams.get(htask, HOST_STREAM) if htask is not None else HOST_STREAM


def htask_streams(body: Sequence[Instruction]) -> dict[int, int]:
    """The stream each hTask of a round body runs on (the first stream its instructions name)."""
    streams: dict[int, int] = {}
    for instruction in body:
        htask = getattr(instruction, "htask", None)
        if htask is not None and hasattr(instruction, "stream"):
            streams.setdefault(htask, instruction.stream)
    return streams


def closing_events(body: Sequence[Instruction]) -> dict[int, str | None]:
    """Every stream of the body and the event it records as its last instruction (None when its
    last instruction is not an event record): once a stream has waited for every other stream's
    closing event, it runs alone."""
    streams = htask_streams(body)
    last: dict[int, Instruction] = {}
    for instruction in body:
        last[stream_of(instruction, streams)] = instruction
    return {s: ins.event if isinstance(ins, RecordEvent) else None for s, ins in sorted(last.items())}


def runs_alone(stream: int, waited: set[str], closing: dict[int, str | None]) -> bool:
    """Whether ``stream``, having waited for the events ``waited``, follows the end of every
    other stream of the body (`closing_events`)."""
    return all(event is not None and event in waited for s, event in closing.items() if s != stream)


class StreamOrder:
    """Checks one body instruction by instruction (`see`), reporting through ``error(index, message)``."""

    def __init__(self, error: Callable[[int, str], None], steps_on_own_streams: bool = False) -> None:
        self.error = error
        self.joined_first = (AllReduce, Checkpoint) if steps_on_own_streams else HOST_INSTRUCTIONS
        self.htask_streams: dict[int, int] = {}
        self.first_seen: dict[int, int] = {}
        self.clocks: dict[int, dict[int, int]] = {}
        self.events: dict[str, dict[int, int]] = {}
        self.last: dict[int, int] = {}
        self.stream_at: dict[int, int] = {}

    def follows(self, stream: int, earlier: int) -> bool:
        """Whether ``stream``'s next instruction is ordered after body index ``earlier`` (same
        stream, or joined through events)."""
        return self.clocks.get(stream, {}).get(self.stream_at[earlier], -1) >= earlier

    def see(self, index: int, instruction: Instruction) -> None:
        """Check ``instruction`` at body position ``index`` and account for it."""
        htask = getattr(instruction, "htask", None)
        if htask is not None and hasattr(instruction, "stream"):
            self._one_stream_per_htask(index, htask, instruction.stream)
        stream = stream_of(instruction, self.htask_streams)
        if isinstance(instruction, (Send, Recv)) and stream != HOST_STREAM:
            self.error(
                index,
                f"{instruction.op.value} of hTask {htask}: sends and receives run on stream 0, "
                f"and hTask {htask} runs on stream {stream}",
            )
        if isinstance(instruction, self.joined_first):
            self._joined(index, instruction)
        clock = self.clocks.setdefault(stream, {})
        work = not isinstance(instruction, (RecordEvent, WaitEvent))
        if work and stream != HOST_STREAM and stream not in self.last and HOST_STREAM not in clock:
            self.error(
                index,
                f"stream {stream} starts work before it waits for an event of stream 0 (which orders it after the "
                f"previous round's optimizer steps)",
            )
        clock[stream] = index
        self.stream_at[index] = stream
        if work:
            self.last[stream] = index
        if isinstance(instruction, RecordEvent):
            self.events[instruction.event] = dict(clock)
        elif isinstance(instruction, WaitEvent):
            for other, done in self.events.get(instruction.event, {}).items():
                clock[other] = max(clock.get(other, -1), done)

    def _one_stream_per_htask(self, index: int, htask: int, stream: int) -> None:
        first = self.htask_streams.setdefault(htask, stream)
        self.first_seen.setdefault(htask, index)
        if first != stream:
            self.error(
                index,
                f"hTask {htask} runs on stream {first} (from [{self.first_seen[htask]}]); this names stream "
                f"{stream} (an hTask's instructions share one stream)",
            )

    def _joined(self, index: int, instruction: Instruction) -> None:
        clock = self.clocks.get(HOST_STREAM, {})
        for stream, last in sorted(self.last.items()):
            if stream != HOST_STREAM and clock.get(stream, -1) < last:
                self.error(
                    index,
                    f"{instruction.op.value} runs on stream 0 before stream {stream}'s work up to [{last}] is "
                    f"joined (record an event on stream {stream} after it and wait for it on stream 0)",
                )
