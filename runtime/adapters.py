"""peft-compatible adapter directories: `adapter_config.json` + `adapter_model.safetensors`.

Keys follow peft's saved layout for the corresponding transformers model:
`base_model.model.<module path>.lora_A.weight` (the adapter name is not part of saved keys).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from muxtune.common.errors import UserError
from muxtune.common.files import atomic_write_bytes

from .peft import TaskPeftConfig

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterError(UserError):
    """An adapter directory that cannot be used, naming the file and what is wrong."""


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file written through `atomic_write_bytes`."""
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def peft_adapter_config(config: TaskPeftConfig, base_model: str, fan_in_fan_out: bool) -> dict:
    """The adapter_config.json contents peft expects for a LoRA adapter."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": sorted(config.target_modules),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def save_adapter(
    out_dir: str | Path,
    config: TaskPeftConfig,
    state: dict[str, torch.Tensor],
    *,
    base_model: str,
    fan_in_fan_out: bool = False,
) -> Path:
    """Write a task's adapter (state keyed `<anchor>.<param>`) as a peft directory; returns it."""
    out_dir = Path(out_dir)
    tensors = {PEFT_PREFIX + key: value.detach().to("cpu") for key, value in state.items()}
    atomic_save_safetensors(tensors, out_dir / WEIGHTS_NAME, metadata={"format": "pt"})
    text = json.dumps(peft_adapter_config(config, base_model, fan_in_fan_out), indent=2, sort_keys=True)
    atomic_write_bytes(out_dir / CONFIG_NAME, (text + "\n").encode())
    return out_dir


def load_adapter(adapter_dir: str | Path) -> tuple[TaskPeftConfig, dict[str, torch.Tensor]]:
    """Read a peft LoRA directory into (config, state keyed `<anchor>.<param>`)."""
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterError(f"{path}: adapter file not found")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{config_path}: invalid JSON: {exc.msg} (line {exc.lineno})") from None
    config = _lora_config_from_peft(raw, config_path)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{weights_path}: not a readable safetensors file: {exc}") from None
    state = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{weights_path}: tensor {key!r} does not start with {PEFT_PREFIX!r}")
        state[key[len(PEFT_PREFIX) :].replace(".default.", ".")] = value
    return config, state


def _lora_config_from_peft(raw: object, path: Path) -> TaskPeftConfig:
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    targets = raw.get("target_modules")
    if isinstance(targets, str) or not isinstance(targets, list) or not targets:
        raise AdapterError(f"{path}: target_modules must be a non-empty list of module names")
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{path}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise AdapterError(f"{path}: lora_alpha must be a positive number, got {alpha!r}")
    return TaskPeftConfig(
        method="lora",
        r=r,
        alpha=float(alpha),
        dropout=float(raw.get("lora_dropout") or 0.0),
        target_modules=tuple(sorted(targets)),
        use_rslora=bool(raw.get("use_rslora", False)),
    )
