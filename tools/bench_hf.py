"""The transformers + peft sides of the benchmarks, each meant to run in a process of its own:

- ``sequential``: each task alone, one after another (a fresh model per task), every global batch
  padded to its longest sequence: what users run today;
- ``task``: one task alone (`muxtune-bench` starts one such process per task, all at once);
- ``mixed``: an mLoRA-style mixed batch (`bench_mixed`): every task's global batch in one batch
  padded to the longest sequence, through one model holding every task's adapter.

Every side trains the global batches MuxTune trains (each task's seeded batch stream), with the
loss of DESIGN section 8, AdamW, the task's schedule and clipping over the task's own
parameters; adapters are fp32 on a backbone of the job's dtype, as in MuxTune. Loading the model
and tokenizing the data are not training time. The sides run on the job's device (``auto`` resolved
as the compiler does: CUDA when a GPU is visible). A side prints one JSON line: non-padding tokens,
padded tokens, training seconds, the wall-clock start and end of training and, on CUDA, the peak of
`torch.cuda.max_memory_allocated` over its training (model included; 0 on CPU).

    python -m muxtune.tools.bench_hf sequential|task|mixed JOB.yaml [--task NAME] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from muxtune.runtime.backbone import DTYPES
from muxtune.runtime.data import Example, batch_indices, load_dataset
from muxtune.runtime.model_sources import resolve_model_dir
from muxtune.runtime.schedules import lr_multiplier
from muxtune.runtime.tokenizer import TextTokenizer, load_tokenizer
from muxtune.specs import LoraSpec, PeftSpec, TaskSpec, load_job_spec

from .hf_batches import padded_batch, padded_batch_loss

if TYPE_CHECKING:
    from peft import LoraConfig


@dataclass(frozen=True)
class SideResult:
    """What one side measured: non-padding and padded tokens, seconds spent training (summed
    over tasks for ``sequential``), when training started and ended (epoch seconds) and the peak
    CUDA memory allocated while training (0 on CPU; the largest task's for ``sequential``)."""

    tokens: int
    padded_tokens: int
    train_seconds: float
    train_start: float
    train_end: float
    peak_gpu_bytes: int = 0


def lora_config(peft: PeftSpec) -> LoraConfig:
    """peft's `LoraConfig` for a task's LoRA spec (the baselines train LoRA only)."""
    from peft import LoraConfig

    if not isinstance(peft, LoraSpec):
        raise ValueError(f"the transformers + peft baselines train LoRA tasks only, got {type(peft).__name__}")
    return LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules=list(peft.target_modules),
        use_rslora=peft.use_rslora,
        use_dora=peft.use_dora,
        task_type="CAUSAL_LM",
    )


def load_base(model_dir: Path, dtype: str, device: str = "cpu") -> nn.Module:
    """The frozen transformers model in ``dtype`` on ``device``."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[dtype]).to(device)


def start_training(device: str) -> float:
    """The epoch seconds training starts at; on CUDA after the queued work and with the peak
    memory statistics reset (what is allocated now, the model, still counts)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    return time.time()


def end_training(device: str) -> tuple[float, int]:
    """The epoch seconds training ended at (after the queued work) and the peak CUDA memory
    allocated since `start_training` (0 on CPU)."""
    if device != "cuda":
        return time.time(), 0
    torch.cuda.synchronize()
    return time.time(), int(torch.cuda.max_memory_allocated())


def fp32_trainable(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """Cast adapter parameters to fp32 (MuxTune keeps adapters in fp32 on any backbone)."""
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return list(params)


def task_batches(task: TaskSpec, tokenizer: TextTokenizer) -> list[list[Example]]:
    """The task's global batch of every step, as MuxTune draws them."""
    usable = load_dataset(task.data.path, task.data.format, tokenizer, task.max_seq_len).usable
    stream = batch_indices(len(usable), task.batch_size, task.seed)
    return [[usable[i] for i in next(stream)] for _ in range(task.steps)]


class TaskOptimizer:
    """A task's AdamW (betas 0.9/0.999, eps 1e-8), LR schedule and clipping over its own parameters."""

    def __init__(self, task: TaskSpec, params: Sequence[nn.Parameter]) -> None:
        self.task = task
        self.params = list(params)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=task.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=task.weight_decay
        )

    def step(self, step: int) -> None:
        """Clip, set the scheduled LR for 0-based ``step``, step and clear the gradients."""
        task = self.task
        torch.nn.utils.clip_grad_norm_(self.params, task.max_grad_norm)
        factor = lr_multiplier(task.schedule.name, step, task.schedule.warmup_steps, task.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = task.lr * factor
        self.optimizer.step()
        self.optimizer.zero_grad()


def single_task_model(model_dir: Path, dtype: str, task: TaskSpec, device: str = "cpu") -> nn.Module:
    """A fresh transformers + peft model on ``device`` holding the task's adapter (named after the task)."""
    from peft import get_peft_model

    return get_peft_model(load_base(model_dir, dtype, device), lora_config(task.peft), adapter_name=task.name)


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """A copy of the adapter's tensors in peft's saved form (keys without the adapter name)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def train_single(model: nn.Module, task: TaskSpec, batches: Sequence[list[Example]]) -> tuple[int, int]:
    """Train the single-task model on its padded batches; (non-padding, padded) tokens."""
    optimizer = TaskOptimizer(task, fp32_trainable([p for p in model.parameters() if p.requires_grad]))
    device = next(model.parameters()).device
    tokens = padded = 0
    for step, batch in enumerate(batches):
        ids, mask, labels = padded_batch(batch, device)
        padded_batch_loss(model(input_ids=ids, attention_mask=mask).logits, labels).backward()
        optimizer.step(step)
        tokens += int(mask.sum())
        padded += ids.numel()
    return tokens, padded


def release(device: str) -> None:
    """Free the previous task's model before the next one loads (its CUDA memory included)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def train_one(model_dir: Path, dtype: str, task: TaskSpec, tokenizer: TextTokenizer, device: str = "cpu") -> SideResult:
    """One task alone."""
    batches = task_batches(task, tokenizer)
    release(device)
    model = single_task_model(model_dir, dtype, task, device)
    start = start_training(device)
    tokens, padded = train_single(model, task, batches)
    end, peak = end_training(device)
    return SideResult(tokens, padded, end - start, start, end, peak)


def train_sequential(
    model_dir: Path, dtype: str, tasks: Sequence[TaskSpec], tokenizer: TextTokenizer, device: str = "cpu"
) -> SideResult:
    """Each task alone on a fresh model, one after another."""
    results = [train_one(model_dir, dtype, task, tokenizer, device) for task in tasks]
    return SideResult(
        tokens=sum(r.tokens for r in results),
        padded_tokens=sum(r.padded_tokens for r in results),
        train_seconds=sum(r.train_seconds for r in results),
        train_start=results[0].train_start,
        train_end=results[-1].train_end,
        peak_gpu_bytes=max(r.peak_gpu_bytes for r in results),
    )


def train_mixed(
    model_dir: Path, dtype: str, tasks: Sequence[TaskSpec], tokenizer: TextTokenizer, device: str = "cpu"
) -> SideResult:
    """Every task in one padded mixed batch per step (`bench_mixed.MixedBatchLora`)."""
    from .bench_mixed import MixedBatchLora

    batches = {t.name: task_batches(t, tokenizer) for t in tasks}
    mixed = MixedBatchLora(load_base(model_dir, dtype, device), tasks)
    start = start_training(device)
    tokens = padded = 0
    for step in range(max(t.steps for t in tasks)):
        counts = mixed.train_step({name: b[step] for name, b in batches.items() if step < len(b)}, step)
        tokens, padded = tokens + counts[0], padded + counts[1]
    end, peak = end_training(device)
    return SideResult(tokens, padded, end - start, start, end, peak)


SIDES = ("sequential", "task", "mixed")


def run_side(side: str, job: Path, task: str | None = None) -> SideResult:
    """Run one side on the job spec's model, dtype, tasks and device (``task`` names the one for ``task``)."""
    from .bench_mfu import bench_device

    spec = load_job_spec(job)
    model_dir = resolve_model_dir(spec.model)
    tokenizer = load_tokenizer(model_dir)
    device = bench_device(spec.cluster.device)
    if side == "sequential":
        return train_sequential(model_dir, spec.dtype, spec.tasks, tokenizer, device)
    if side == "mixed":
        return train_mixed(model_dir, spec.dtype, spec.tasks, tokenizer, device)
    chosen = [t for t in spec.tasks if t.name == task]
    if len(chosen) != 1:
        raise ValueError(f"--task: the job has no task {task!r}")
    return train_one(model_dir, spec.dtype, chosen[0], tokenizer, device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muxtune.tools.bench_hf", description=__doc__.split("\n")[0])
    parser.add_argument("side", choices=SIDES)
    parser.add_argument("job", type=Path, help="the job spec (model, dtype, tasks)")
    parser.add_argument("--task", help="the task a 'task' side trains")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(asdict(run_side(args.side, args.job, args.task))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
