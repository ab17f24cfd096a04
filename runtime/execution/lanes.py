"""Streams as lanes on the CPU: each stream of a round body runs on its own thread with an equal
share of the rank's intra-op threads, ordered across streams only by the body's events.

A CPU has no streams to overlap work on, but a 2-core machine runs one hTask's small products,
element-wise passes and Python on one core while another hTask's run on the other, instead of
splitting every operator across both cores (a GEMM gains 2x from the second core, the rest of a
decoder layer much less). The plan's body checks guarantee what makes this safe: each hTask's
instructions sit on one stream, and what acts on every task (optimizer steps, checkpoints) runs
on stream 0 after joining the others. Each lane replays its instructions in body order, so a
stream's results do not depend on the other lanes' timing.

A lane that has waited for every other lane's closing event (`closing_events`: each other lane has
finished the round's work) runs the rest of its instructions with all the rank's threads. Where
that happens is fixed by the body (the compiler puts stream 0's join before its last
micro-batches when that shortens the round), so which instructions run on how many threads never
depends on timing, and neither do the results.

With one stream, or fewer than two intra-op threads (a multi-rank run on a small machine, or a
GPU, whose streams are CUDA streams issued in order), the body runs in order on the calling
thread (events are already satisfied in body order).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from muxtune.plans import Instruction, RecordEvent, WaitEvent
from muxtune.plans.stream_checks import HOST_STREAM, closing_events, htask_streams, runs_alone, stream_of

WAIT_POLL_SECONDS = 0.05
"""How often a lane blocked on an event looks whether another lane failed."""


def split_lanes(body: Sequence[Instruction]) -> dict[int, list[Instruction]]:
    """The body's instructions by stream (stream 0 first), each in body order."""
    streams = htask_streams(body)
    lanes: dict[int, list[Instruction]] = {HOST_STREAM: []}
    for instruction in body:
        lanes.setdefault(stream_of(instruction, streams), []).append(instruction)
    return lanes


class _Aborted(Exception):
    """Another lane failed; this one stopped at an instruction boundary."""


class LaneRunner:
    """Runs round bodies with ``threads`` intra-op threads in all (`run`)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    def close(self) -> None:
        """Stop the worker threads (they are idle between rounds)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            self._pool_size = 0

    def run(self, body: Sequence[Instruction], execute: Callable[[Instruction], None]) -> int:
        """Execute ``body`` (instruction by instruction through ``execute``, events included:
        the lanes wait for and set them around it); returns how many lanes ran at once."""
        lanes = split_lanes(body) if self.threads >= 2 else {HOST_STREAM: list(body)}
        if len(lanes) == 1:
            for instruction in body:
                execute(instruction)
            return 1
        per_lane = max(1, self.threads // len(lanes))
        events = {ins.event: threading.Event() for ins in body if isinstance(ins, RecordEvent)}
        closing = closing_events(body)
        failed = threading.Event()

        def replay(stream: int) -> None:
            torch.set_num_threads(per_lane)
            waited: set[str] = set()
            try:
                for instruction in lanes[stream]:
                    if failed.is_set():
                        raise _Aborted
                    if isinstance(instruction, WaitEvent):
                        while not events[instruction.event].wait(WAIT_POLL_SECONDS):
                            if failed.is_set():
                                raise _Aborted
                        waited.add(instruction.event)
                        if runs_alone(stream, waited, closing):
                            torch.set_num_threads(self.threads)
                    execute(instruction)
                    if isinstance(instruction, RecordEvent):
                        events[instruction.event].set()
            except BaseException:
                failed.set()
                raise

        pool = self._workers(len(lanes) - 1)
        others = [pool.submit(replay, s) for s in sorted(lanes) if s != HOST_STREAM]
        try:
            with contextlib.suppress(_Aborted):
                replay(HOST_STREAM)
        finally:
            torch.set_num_threads(self.threads)
            errors = [_outcome(f, failed) for f in others]
        first = next((e for e in errors if e is not None and not isinstance(e, _Aborted)), None)
        if first is not None:
            raise first
        return len(lanes)

    def _workers(self, count: int) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_size < count:
            self.close()
            self._pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="muxtune-lane")
            self._pool_size = count
        return self._pool


def _outcome(lane: Future, failed: threading.Event) -> BaseException | None:
    """The lane's exception once it ends; an interruption while waiting stops the other lanes too."""
    try:
        return lane.exception()
    except BaseException:
        failed.set()
        raise
