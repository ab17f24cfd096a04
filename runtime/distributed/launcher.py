"""`muxtune-run` starting a multi-rank plan's processes itself, through torch's elastic
launcher (what torchrun runs): one process per rank on this machine, each running
`muxtune.runtime.launch`. When a rank fails (an error, a crash, a kill) the launcher stops
the others at once and this names the rank that failed first and how."""

from __future__ import annotations

import logging
import signal
import sys
import uuid
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from muxtune.common.cli import USER_ERROR_EXIT

from ..summary_text import DIVERGED_EXIT

FAILED_EXIT = 1
MONITOR_INTERVAL_S = 0.5
SHUTDOWN_TIMEOUT_S = 5
"""Seconds a rank gets to stop after SIGTERM before SIGKILL (a hung rank may ignore SIGTERM)."""


def _how(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def launch_ranks(plan_path: str, num_ranks: int, flags: Sequence[str] = ()) -> int:
    """Run the plan's ``num_ranks`` ranks as local processes, each with the command-line
    ``flags`` (``--resume``, ``--trace``, ``--profile``); the job's exit status."""
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=num_ranks,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=MONITOR_INTERVAL_S,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        logs_specs=DefaultLogsSpecs(),
    )
    args = ("-u", "-m", "muxtune.runtime.launch", plan_path, *flags)
    try:
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as exc:
        # Ranks the launcher stopped itself (SIGTERM) come after those that failed on their own.
        failures = sorted(
            exc.failures.items(),
            key=lambda item: (item[1].exitcode == -signal.SIGTERM, item[1].timestamp, item[0]),
        )
        rank, first = failures[0]
        if first.exitcode in (USER_ERROR_EXIT, DIVERGED_EXIT):
            return first.exitcode  # the rank printed why
        others = [f"rank {r} {_how(f.exitcode)}" for r, f in failures[1:] if f.exitcode != -signal.SIGTERM]
        print(
            f"muxtune-run: error: rank {rank} {_how(first.exitcode)}; the job stopped"
            + (f" ({', '.join(others)})" if others else "")
            + f"; continue with: muxtune-run {plan_path} --resume",
            file=sys.stderr,
        )
        return FAILED_EXIT
    return 0
