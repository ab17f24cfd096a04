"""Job spec v1: frozen dataclasses with every default resolved (DESIGN section 8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from .peft import PeftSpec

Dtype = Literal["fp32", "bf16", "fp16"]
DataFormat = Literal["text", "prompt_completion"]
ScheduleName = Literal["constant", "linear", "cosine"]
Auto = Literal["auto"]

DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")
DATA_FORMATS: tuple[str, ...] = ("text", "prompt_completion")
SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "a40", "a100", "h100", "h200")
REPORTERS: tuple[str, ...] = ("tensorboard",)
"""Where ``report_to`` can send each task's step metrics, besides its ``metrics.jsonl``."""
NO_REPORTING = "none"

TASK_NAME_PATTERN = r"[a-z0-9_-]{1,64}"
"""Task names are also folder names: short, no separators or dots."""
BUILTIN_PREFIX = "builtin:"

# Largest values a spec may ask for: beyond them a job cannot be served (a global batch of
# 10^12 sequences is a 10^12-element list), so they are refused when the spec is read.
MAX_BATCH_SIZE = 65_536
MAX_SEQ_LEN = 1_048_576
MAX_STEPS = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_DEVICES = 65_536


@dataclass(frozen=True)
class ClusterSpec:
    """Where to run (or what to plan for). ``auto`` leaves the choice to the compiler."""

    device: str = "auto"
    num_devices: int = 1
    memory_gb: Union[float, Auto] = "auto"
    pipeline_parallel: Union[int, Auto] = "auto"
    tensor_parallel: Union[int, Auto] = "auto"


@dataclass(frozen=True)
class DataSpec:
    """A JSONL dataset: ``path`` is absolute once loaded."""

    path: str
    format: DataFormat


@dataclass(frozen=True)
class ScheduleSpec:
    """Learning-rate schedule over the task's ``steps`` (transformers' definitions)."""

    name: ScheduleName = "constant"
    warmup_steps: int = 0


@dataclass(frozen=True)
class TaskSpec:
    """One tenant's fine-tuning task with resolved hyperparameters."""

    name: str
    peft: PeftSpec
    data: DataSpec
    max_seq_len: int = 128
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    schedule: ScheduleSpec = ScheduleSpec()
    steps: int = 50
    seed: int = 0
    init_from: str | None = None
    save_every: int = 0


@dataclass(frozen=True)
class JobSpec:
    """A whole job: one backbone, many tasks. Paths are absolute. ``report_to`` holds the
    integrations (from `REPORTERS`) that also get each task's step metrics; empty for none."""

    model: str
    dtype: Dtype
    output_dir: str
    cluster: ClusterSpec
    tasks: tuple[TaskSpec, ...]
    report_to: tuple[str, ...] = ()

    def task(self, name: str) -> TaskSpec:
        """The task called ``name`` (KeyError if there is none)."""
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(name)

    @property
    def is_builtin_model(self) -> bool:
        return self.model.startswith(BUILTIN_PREFIX)
