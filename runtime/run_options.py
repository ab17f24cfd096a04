"""`muxtune-run`'s command line, shared by the single-process command and each rank under
torchrun; torch-free, so that a command can choose its allocator before torch is imported."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

PROG = "muxtune-run"


@dataclass(frozen=True)
class RunOptions:
    """What `muxtune-run`'s switches ask of every rank."""

    resume: bool = False
    trace: bool = False
    profile: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def flags(self) -> list[str]:
        """The command-line switches that ask for these options."""
        return [f"--{f.name}" for f in dataclasses.fields(self) if getattr(self, f.name)]


def run_arguments(description: str) -> argparse.ArgumentParser:
    """The command line `muxtune-run` and this module share: the plan, --resume, --trace, --profile, --debug."""
    parser = argparse.ArgumentParser(prog=PROG, description=description)
    parser.add_argument("plan", help="plan file written by muxtune-compile")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    parser.add_argument(
        "--trace", action="store_true", help="write each rank's instruction timeline to output_dir/trace/ (Perfetto)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile three round bodies after the first with torch.profiler into output_dir/profile/",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser
