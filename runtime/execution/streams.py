"""Streams and events behind one small interface: CUDA streams and events on a GPU, and on the
CPU one sequential stream where recording and waiting are no-ops (work is already ordered)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class StreamSet:
    """The numbered streams of one rank and the named events recorded on them."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._events: dict[str, torch.cuda.Event] = {}

    def _stream(self, index: int) -> torch.cuda.Stream:
        if index not in self._streams:
            self._streams[index] = torch.cuda.current_stream() if index == 0 else torch.cuda.Stream()
        return self._streams[index]

    @contextlib.contextmanager
    def on(self, index: int) -> Iterator[None]:
        """Issue the enclosed work on stream ``index``."""
        if not self.cuda:
            yield
            return
        with torch.cuda.stream(self._stream(index)):
            yield

    def record(self, event: str, index: int) -> None:
        """Mark what stream ``index`` has issued so far as ``event``."""
        if self.cuda:
            self._events[event] = self._stream(index).record_event()

    def wait(self, event: str, index: int) -> None:
        """Make stream ``index`` wait for ``event``."""
        if self.cuda:
            self._stream(index).wait_event(self._events[event])
