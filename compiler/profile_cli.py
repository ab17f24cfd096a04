"""`muxtune-profile [--model MODEL] [--dtype DTYPE] [--threads N] -o profile.yaml [--quick]`:
measure this machine for the compiler's cost model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from muxtune.common.cli import console_entry, run_command
from muxtune.common.errors import UserError

from .cost.profile import PROFILE_DEVICES, PROFILE_DTYPES, Profile, save_profile

PROG = "muxtune-profile"
QUICK_TOKEN_COUNTS = (128,)
QUICK_SEQUENCE_LENGTHS = (64,)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Measure this machine (and a model's micro-batch costs) for the compiler's cost model.",
    )
    parser.add_argument(
        "--model",
        help="the job spec's model (builtin:NAME, a HF directory or a .gguf file); without it, rates only",
    )
    parser.add_argument("--dtype", choices=PROFILE_DTYPES, default="fp32", help="dtype to measure in (default fp32)")
    parser.add_argument("--device", choices=PROFILE_DEVICES, default="cpu", help="device to measure (default cpu)")
    parser.add_argument("--threads", type=_positive_int, help="intra-op threads (default: torch's)")
    parser.add_argument("-o", "--output", required=True, help="where to write the profile (YAML)")
    parser.add_argument(
        "--quick", action="store_true", help="one token count and sequence length, one repeat (for tests)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def format_table(profile: Profile) -> list[str]:
    """The profile's rates and measurements as aligned text lines."""
    lines = [
        f"machine   {profile.machine} ({profile.threads} threads, {profile.dtype} on {profile.device})",
        f"matmul    {profile.matmul_flops / 1e9:.1f} GFLOP/s",
        f"memory    {profile.memory_bandwidth / 1e9:.2f} GB/s",
        f"tiny op   {profile.op_overhead_seconds * 1e6:.2f} us",
        f"runtime   {profile.runtime_bytes / 2**20:.0f} MiB resident",
    ]
    if profile.measurements:
        lines.append(f"model     {profile.model} (LoRA r{profile.lora_rank})")
        lines.append(
            f"{'component':<16}{'tokens':>8}{'seq':>6}{'targets':>9}{'params':>10}{'seconds':>10}{'tok/s':>10}"
        )
        for m in profile.measurements:
            rate = f"{m.tokens / m.seconds:.0f}" if m.tokens else "-"
            lines.append(
                f"{m.component:<16}{m.tokens:>8}{m.sequence_length:>6}{m.target_tokens:>9}"
                f"{m.trainable_parameters:>10}{m.seconds:>10.4f}{rate:>10}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def profile_command() -> int:
        output = Path(args.output)
        if output.is_dir():
            raise UserError(f"{output}: is a directory; -o names the profile file to write")
        import torch

        from .profiler import DEFAULT_SEQUENCE_LENGTHS, DEFAULT_TOKEN_COUNTS, measure_profile

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        profile = measure_profile(
            args.model,
            args.dtype,
            token_counts=QUICK_TOKEN_COUNTS if args.quick else DEFAULT_TOKEN_COUNTS,
            sequence_lengths=QUICK_SEQUENCE_LENGTHS if args.quick else DEFAULT_SEQUENCE_LENGTHS,
            repeats=1 if args.quick else 3,
            device=args.device,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
        path = save_profile(profile, output)
        for line in format_table(profile):
            print(line)
        print(f"wrote {path}")
        return 0

    return run_command(PROG, profile_command, args.debug)


entry = console_entry(main)


if __name__ == "__main__":
    entry()
