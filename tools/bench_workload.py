"""The workload of `muxtune-bench`: up to eight LoRA tasks of mixed lengths and ranks, the job
spec every row trains, and the models it runs on.

The tasks follow the paper's mix: SST-2-like sentiment (~64 tokens), OpenBookQA-like multiple
choice (~128), RTE-like entailment (~256) and an instruction task (30-200), over the bundled
datasets (`tools/data/*.jsonl`). Four tasks are one of each; eight add a second of each with
another rank, targets, learning rate and batch seed. Ranks run from 8 to 32, alpha is twice the
rank, and there is no warm-up, so even a one-step run changes every adapter.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from muxtune.common.errors import UserError
from muxtune.specs import JobSpec, load_job_spec
from muxtune.specs.parse import to_plain

DATA = Path(__file__).resolve().parent / "data"
BASE_MODEL = "builtin:smollm2-135m"
LAYERS_PREFIX = "layers="

QV = ("q_proj", "v_proj")
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = (*QKVO, "gate_proj", "up_proj", "down_proj")


class BenchError(UserError):
    """A bench option that cannot be used, naming the option."""


@dataclass(frozen=True)
class BenchTask:
    """One task of the workload (its dataset is `tools/data/<dataset>.jsonl`)."""

    name: str
    dataset: str
    rank: int
    targets: tuple[str, ...]
    max_seq_len: int
    batch_size: int
    lr: float
    schedule: str
    seed: int = 0
    rslora: bool = False

    def spec(self, steps: int) -> dict:
        """The task as a job spec entry (spec v1) training ``steps`` optimizer steps."""
        return {
            "name": self.name,
            "peft": {
                "method": "lora",
                "r": self.rank,
                "alpha": 2 * self.rank,
                "target_modules": list(self.targets),
                "use_rslora": self.rslora,
            },
            "data": {"path": str(DATA / f"{self.dataset}.jsonl"), "format": "prompt_completion"},
            "max_seq_len": self.max_seq_len,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "schedule": {"name": self.schedule, "warmup_steps": 0},
            "steps": steps,
            "seed": self.seed,
        }


WORKLOAD = (
    BenchTask("sentiment", "sentiment", 8, QV, 96, 8, 1e-3, "cosine"),
    BenchTask("qa", "qa", 16, QKVO, 160, 4, 1e-3, "cosine"),
    BenchTask("entailment", "entailment", 32, ("q_proj", "v_proj", "up_proj", "down_proj"), 288, 4, 2e-3, "linear"),
    BenchTask("instructions", "instructions", 8, ALL_LINEAR, 256, 4, 2e-3, "constant", rslora=True),
    BenchTask("sentiment-2", "sentiment", 16, QKVO, 96, 8, 5e-4, "linear", seed=1),
    BenchTask("qa-2", "qa", 32, QV, 160, 4, 2e-3, "constant", seed=1),
    BenchTask("entailment-2", "entailment", 8, ALL_LINEAR, 288, 4, 1e-3, "cosine", seed=1),
    BenchTask("instructions-2", "instructions", 24, ("q_proj", "v_proj", "o_proj"), 256, 4, 1e-3, "linear", seed=1),
)


def workload(num_tasks: int) -> tuple[BenchTask, ...]:
    """The first ``num_tasks`` tasks of the workload (1 to 8)."""
    if not 1 <= num_tasks <= len(WORKLOAD):
        raise BenchError(f"--tasks: must be between 1 and {len(WORKLOAD)}, got {num_tasks}")
    return WORKLOAD[:num_tasks]


def write_job(
    path: Path, model: str, dtype: str, tasks: Sequence[BenchTask], steps: int, overrides: Sequence[str] = ()
) -> JobSpec:
    """Write the job spec every row of one configuration trains, with the spec ``overrides``
    (``key=value``, as `muxtune-compile` takes them) applied and checked; ``output_dir`` is set
    per row."""
    job = {"model": model, "dtype": dtype, "output_dir": "out", "tasks": [t.spec(steps) for t in tasks]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    spec = load_job_spec(path, overrides)
    path.write_text(yaml.safe_dump(to_plain(spec), sort_keys=False))
    return spec


def resolve_bench_model(model: str, scratch: Path) -> tuple[str, str]:
    """(the spec's ``model`` value, a label for tables) for a ``--model`` value: a builtin, a
    model directory, ``layers=N``, the first N decoder layers of SmolLM2-135M, or ``random:NAME``,
    a LLaMA model with random weights (`bench_models`); the last two are written under ``scratch``
    (once)."""
    from muxtune.runtime.model_sources import resolve_model_dir

    from .bench_models import RANDOM_MODELS, RANDOM_PREFIX, write_random_model
    from .truncate_model import truncate_model

    if model.startswith(RANDOM_PREFIX):
        name = model.removeprefix(RANDOM_PREFIX)
        if name not in RANDOM_MODELS:
            raise BenchError(
                f"--model: unknown {model!r}; choose from {', '.join(RANDOM_PREFIX + n for n in RANDOM_MODELS)}"
            )
        try:
            out = write_random_model(name, scratch / f"random-{name}")
        except UserError as exc:
            raise BenchError(f"--model {model}: {exc}") from None
        return str(out), RANDOM_MODELS[name].label
    if model.startswith(LAYERS_PREFIX):
        count = model.removeprefix(LAYERS_PREFIX)
        if not count.isdigit():
            raise BenchError(f"--model: {LAYERS_PREFIX}N needs a whole number of layers, got {model!r}")
        try:
            out = truncate_model(BASE_MODEL, int(count), scratch / f"smollm2-{count}l")
        except UserError as exc:
            raise BenchError(f"--model {model}: {exc}") from None
        return str(out), f"SmolLM2-135M, first {int(count)} layers"
    try:
        source = resolve_model_dir(model)
    except UserError as exc:
        raise BenchError(f"--model: {exc}") from None
    layers = json.loads((source / "config.json").read_text()).get("num_hidden_layers")
    return model, f"{model} ({layers} layers)"
