"""What every MuxTune command line shares: user errors exit 2 with a message, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130


def run_command(
    prog: str,
    main: Callable[[], int],
    user_errors: tuple[type[BaseException], ...],
    debug: bool,
    interrupt_hint: str = "",
) -> int:
    """Run `main`; a user error prints `prog: error: ...` (each line of a multi-error message
    indented) and returns 2, unless `debug` asks for the traceback. Ctrl-C prints
    `interrupt_hint` (how to continue) and returns 130."""
    try:
        return main()
    except user_errors as exc:
        if debug:
            raise
        lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        if len(lines) == 1:
            print(f"{prog}: error: {lines[0]}", file=sys.stderr)
        else:
            print(f"{prog}: {len(lines)} errors:", file=sys.stderr)
            for line in lines:
                print(f"  {line}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{'; ' + interrupt_hint if interrupt_hint else ''}", file=sys.stderr)
        return INTERRUPTED_EXIT
