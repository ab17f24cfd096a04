"""Whether a job's backbone and tasks can be split over tensor-parallel ranks: the backbone family
has tensor-parallel layers, and every task's PEFT modules have a tensor-parallel form at the
operators they adapt (`OperatorPeftModule.shard_dims`)."""

from __future__ import annotations

import torch
from torch import nn

from muxtune.runtime.models import BackboneConfig, build_model
from muxtune.runtime.peft import PeftHost, attach_task, detach_task
from muxtune.runtime.peft.registry import backbone_modules
from muxtune.runtime.sharding import TensorSplit, host_shard, split_problem
from muxtune.specs import JobSpec, PeftSpec


def may_split(spec: JobSpec) -> bool:
    """Whether the cluster spec leaves room for tensor parallelism (fixed above 1, or auto on
    several devices)."""
    degree = spec.cluster.tensor_parallel
    return degree != 1 and (degree != "auto" or spec.cluster.num_devices > 1)


def tensor_parallel_problems(config: BackboneConfig, spec: JobSpec) -> list[str]:
    """Why the job cannot run tensor-parallel, one line per backbone or task problem (empty
    when it can); the tasks' PEFT configs are assumed to fit the unsplit backbone."""
    try:
        model = build_model(config, device="meta", split=TensorSplit(1, 0))
    except ValueError as exc:
        return [f"model: {exc}"]
    problems = []
    verdicts: dict[PeftSpec, str | None] = {}  # one attachment per distinct PEFT config
    for i, task in enumerate(spec.tasks):
        if task.peft not in verdicts:
            verdicts[task.peft] = first_split_problem(model, task.name, task.peft)
        if verdicts[task.peft] is not None:
            problems.append(f"tasks[{i}].peft: {verdicts[task.peft]}")
    return problems


def first_split_problem(model: nn.Module, task: str, peft: PeftSpec) -> str | None:
    """The first host of ``model`` (built with a split) where ``peft``'s module cannot be split,
    named with the reason; None when every module can."""
    attach_task(model, task, peft, seed=0, dropout_generator=torch.Generator())
    try:
        for path, host in backbone_modules(model):
            if isinstance(host, PeftHost) and task in host.adapters:
                problem = split_problem(host.adapters[task], host_shard(host))
                if problem is not None:
                    return f"{peft.method} at {path}: {problem}"
        return None
    finally:
        detach_task(model, task)
