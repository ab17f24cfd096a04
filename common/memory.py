"""This process's peak resident memory."""

from __future__ import annotations

import resource
import sys


def peak_resident_bytes() -> int:
    """The peak resident set of this process since it started its program: Linux's VmHWM.
    `ru_maxrss` is the fallback; on Linux it also counts the parent's pages from before exec
    (a run started from a large process would report the parent's size)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
