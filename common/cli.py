"""What every MuxTune command line shares: user errors exit 2 with a bounded message, no
traceback; file-system errors (permission denied, a folder where a file should be, a full
disk) are user errors too, naming the path."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from .errors import UserError
from .text import clip_line

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130
MAX_ERROR_LINES = 40
"""A message lists at most this many problems; the rest are counted."""


def describe_os_error(exc: OSError) -> str:
    """``<path>: <reason>`` for a file-system error (the rename target when there is one)."""
    path = exc.filename2 if exc.filename2 is not None else exc.filename
    reason = exc.strerror or (os.strerror(exc.errno) if exc.errno else type(exc).__name__)
    return f"{os.fsdecode(path)}: {reason.lower()}" if path is not None else reason


def bounded_lines(message: str) -> list[str]:
    """The non-empty lines of ``message``, each clipped, at most `MAX_ERROR_LINES` of them."""
    lines = [line for line in message.splitlines() if line.strip()]
    if len(lines) > MAX_ERROR_LINES:
        hidden = len(lines) - MAX_ERROR_LINES + 1
        lines = lines[: MAX_ERROR_LINES - 1] + [f"... and {hidden} more"]
    return [clip_line(line) for line in lines]


def run_command(prog: str, main: Callable[[], int], debug: bool, interrupt_hint: str = "") -> int:
    """Run `main`; a `UserError` (or an `OSError`) prints `prog: error: ...` (each line of a
    multi-error message indented) and returns 2, unless `debug` asks for the traceback.
    Ctrl-C prints `interrupt_hint` (how to continue) and returns 130."""
    try:
        return main()
    except (UserError, OSError) as exc:
        if debug:
            raise
        if isinstance(exc, OSError) and exc.errno is not None:
            message = describe_os_error(exc)
        else:
            message = str(exc)
        count = sum(1 for line in message.splitlines() if line.strip())
        lines = bounded_lines(message) or [type(exc).__name__]
        if len(lines) == 1:
            print(f"{prog}: error: {lines[0]}", file=sys.stderr)
        else:
            print(f"{prog}: {count} errors:", file=sys.stderr)
            for line in lines:
                print(f"  {line}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{'; ' + interrupt_hint if interrupt_hint else ''}", file=sys.stderr)
        return INTERRUPTED_EXIT


def exit_process(code: int) -> NoReturn:
    """End a command's process with ``code``: as at a normal exit, running threads that are not
    daemons are waited for, the atexit handlers run and the standard streams are flushed; but
    the interpreter's teardown of every module and object is skipped (~0.4 s once torch is
    loaded). Every file a command writes is closed (and synced) before its `main` returns, so
    nothing is lost; commands called in-process (tests) return from `main` instead. Under a
    tracer or profiler (coverage, ``python -m cProfile``) the process exits normally, so that
    the tool can write its results."""
    if sys.gettrace() is not None or sys.getprofile() is not None:
        raise SystemExit(code)
    threading._shutdown()  # what the interpreter's exit does first: join non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe or stream: what a normal exit would also fail to write
    os._exit(code)


def console_entry(main: Callable[[], int]) -> Callable[[], NoReturn]:
    """A console command's entry point (what pyproject's scripts and ``python -m`` call): `main`
    with the command line, then `exit_process`."""

    def entry() -> NoReturn:
        exit_process(main())

    return entry
