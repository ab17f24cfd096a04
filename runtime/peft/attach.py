"""Attaching tasks' PEFT modules to a backbone at anchors chosen by `target_modules`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import OperatorPeftModule, PeftHost
from .lora import LoraConfig, LoraModule

SUPPORTED_METHODS = ("lora",)


@dataclass(frozen=True)
class TaskPeftConfig:
    """What a task attaches and where: a method, its hyperparameters and target module names."""

    method: str
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False

    def lora_config(self) -> LoraConfig:
        return LoraConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, use_rslora=self.use_rslora)


def is_anchorable(module: nn.Module) -> bool:
    """True for the backbone operators an operator-level PEFT module can attach to: PEFT hosts."""
    return isinstance(module, PeftHost)


def matches_target(name: str, target_modules: tuple[str, ...]) -> bool:
    """peft's rule for a list of targets: the full name, or a dotted suffix of it."""
    return name in target_modules or any(name.endswith("." + t) for t in target_modules)


def find_anchors(model: nn.Module, target_modules: tuple[str, ...]) -> list[str]:
    """Names of the hosts selected by `target_modules`, in model order."""
    return [
        name for name, module in model.named_modules() if is_anchorable(module) and matches_target(name, target_modules)
    ]


def build_peft_module(
    config: TaskPeftConfig, base: nn.Module, dtype: torch.dtype, device: torch.device
) -> OperatorPeftModule:
    """A fresh (not yet initialized) module of the task's method for one anchor."""
    if config.method == "lora":
        return LoraModule(base.in_features, base.out_features, config.lora_config(), dtype=dtype, device=device)
    raise ValueError(f"unsupported PEFT method {config.method!r}; supported: {', '.join(SUPPORTED_METHODS)}")


def attach_task(
    model: nn.Module,
    task: str,
    config: TaskPeftConfig,
    *,
    seed: int,
    dropout_generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> dict[str, OperatorPeftModule]:
    """Attach `task`'s modules at every anchor its targets select; returns them by anchor name.

    Initialization is drawn from a generator seeded with the task seed, anchor by anchor in
    model order, so it depends on nothing but the task itself; dropout masks come from the
    task's own `dropout_generator`.
    """
    anchors = find_anchors(model, config.target_modules)
    if not anchors:
        raise ValueError(
            f"task {task}: target_modules {list(config.target_modules)} match no linear operator of the model"
        )
    generator = torch.Generator().manual_seed(seed)
    modules: dict[str, OperatorPeftModule] = {}
    for name in anchors:
        host = model.get_submodule(name)
        device = host.weight.device
        module = build_peft_module(config, host, dtype, device if device.type != "meta" else torch.device("cpu"))
        module.reset_parameters(generator)
        module.set_dropout_generator(dropout_generator)
        host.add_adapter(task, module)
        modules[name] = module
    return modules


def detach_task(model: nn.Module, task: str) -> None:
    """Remove `task`'s modules from every host (the others' modules stay)."""
    for module in model.modules():
        if isinstance(module, PeftHost):
            module.remove_adapter(task)
