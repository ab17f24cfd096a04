"""Helpers for end-to-end tests of the user path on builtin:tiny-llama: small jobs, CLIs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tools" / "data"


def write_job(directory: Path, tasks: list[dict] | None = None, **fields: object) -> Path:
    """A small three-task job on builtin:tiny-llama over the bundled datasets."""
    directory.mkdir(parents=True, exist_ok=True)
    job = {
        "model": "builtin:tiny-llama",
        "output_dir": "out",
        "tasks": tasks if tasks is not None else default_tasks(),
        **fields,
    }
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def default_tasks() -> list[dict]:
    return [
        {
            "name": "sentiment",
            "peft": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "data": {"path": str(DATA / "sentiment.jsonl"), "format": "prompt_completion"},
            "max_seq_len": 200,
            "batch_size": 4,
            "lr": 2e-3,
            "steps": 6,
            "save_every": 2,
        },
        {
            "name": "qa",
            "peft": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "data": {"path": str(DATA / "qa.jsonl"), "format": "prompt_completion"},
            "max_seq_len": 400,
            "batch_size": 2,
            "lr": 1e-3,
            "steps": 5,
            "save_every": 1,
            "schedule": {"name": "cosine", "warmup_steps": 1},
        },
        {
            "name": "instructions",
            "peft": {"r": 2, "alpha": 4, "target_modules": ["gate_proj", "down_proj"]},
            "data": {"path": str(DATA / "instructions.jsonl"), "format": "prompt_completion"},
            "max_seq_len": 160,
            "batch_size": 3,
            "lr": 3e-3,
            "steps": 7,
            "save_every": 3,
            "schedule": {"name": "linear", "warmup_steps": 2},
        },
    ]


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a MuxTune command line (`compile`, `run`, ...) in a subprocess."""
    modules = {
        "compile": "muxtune.compiler.cli",
        "run": "muxtune.runtime.cli",
        "quickstart": "muxtune.tools.quickstart",
    }
    command = [sys.executable, "-m", modules[args[0]], *args[1:]]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def kill_run_when(plan: Path, marker: Path, *args: str) -> None:
    """Start `muxtune-run plan`, SIGKILL it as soon as `marker` exists, and check it was killed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "muxtune.runtime.cli", str(plan), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes (to show nothing was written)."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
