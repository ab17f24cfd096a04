"""The memory allocator MuxTune's commands run on.

Training on the CPU allocates and frees activation-sized buffers many times a round. glibc's
malloc hands the largest back to the kernel and faults them in again, and its heap fragments so
that the resident set grows from round to round; tcmalloc keeps them (measured in BENCHMARKS.md,
"fifth round"). A command that allocates much restarts itself once, before torch is imported,
with tcmalloc preloaded when the machine has it (Debian/Ubuntu: ``libtcmalloc-minimal4``), as
``torch.backends.xeon.run_cpu`` does.

``MUXTUNE_MALLOC`` chooses: ``auto`` (the default: tcmalloc when found, else the system's),
``system`` (never preload), or the path of a malloc library to preload.
"""

from __future__ import annotations

import ctypes.util
import os
import re
import sys
from pathlib import Path

from .cli import run_command
from .errors import UserError

ALLOCATOR_ENV = "MUXTUNE_MALLOC"
SEARCHED_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
"""What ``auto`` looks for, in this order (names as `ctypes.util.find_library` takes them)."""
KNOWN_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")
QUIET_LARGE_ALLOCATIONS = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 62)}
"""tcmalloc reports every allocation over 1 GiB on stderr unless told otherwise."""


def chosen_allocator() -> str | None:
    """The library ``MUXTUNE_MALLOC`` asks to preload (a path or a soname), or None for the system's."""
    choice = os.environ.get(ALLOCATOR_ENV, "auto").strip() or "auto"
    if choice == "system":
        return None
    if choice == "auto":
        if not sys.platform.startswith("linux"):
            return None
        return next((found for name in SEARCHED_LIBRARIES if (found := ctypes.util.find_library(name))), None)
    if not Path(choice).is_file():
        raise UserError(f"{ALLOCATOR_ENV}={choice}: no such file (give 'auto', 'system' or a malloc library's path)")
    return choice


def preloaded_libraries(environ: dict[str, str] | os._Environ[str]) -> list[str]:
    """The entries of ``LD_PRELOAD`` (separated by spaces or colons)."""
    return [entry for entry in re.split(r"[\s:]+", environ.get("LD_PRELOAD", "")) if entry]


def restart_with_allocator(prog: str) -> None:
    """Re-execute this process's own command line with the chosen allocator preloaded, unless
    none is chosen or ``LD_PRELOAD`` holds a malloc library already; returns only then. Call it
    first thing in a command's ``main``, before torch is imported, and only for a real command
    line (not from a test). A ``MUXTUNE_MALLOC`` that names no file exits with status 2."""

    def restart() -> int:
        library = chosen_allocator()
        preloaded = preloaded_libraries(os.environ)
        if library is None or any(known in Path(entry).name for entry in preloaded for known in KNOWN_ALLOCATORS):
            return 0
        environ = {**QUIET_LARGE_ALLOCATIONS, **os.environ, "LD_PRELOAD": " ".join([library, *preloaded])}
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)

    status = run_command(prog, restart, debug=False)
    if status:
        raise SystemExit(status)


def active_allocator() -> str:
    """The malloc library this process runs on: a known allocator's file mapped into it, or
    ``system`` (glibc's malloc on Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        name = Path(fields[5]).name if len(fields) == 6 else ""
        if any(known in name for known in KNOWN_ALLOCATORS):
            return name
    return "system"
