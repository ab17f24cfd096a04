"""Adapter directories: `adapter_config.json` + `adapter_model.safetensors`.

peft's own format for the methods peft has (LoRA, rsLoRA, DoRA, IA3, prefix and prompt tuning):
`peft.PeftModel.from_pretrained` loads them. The methods peft lacks (`adapter`, `bias`) use the
same two files with a `peft_type` of their own (see docs/adapter-format.md). Which method
writes and reads a directory is the registry's business (`PeftMethod.export` / `load`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from muxtune.common.files import atomic_write_bytes
from muxtune.specs import PeftSpec

from .models.config import BackboneConfig
from .peft.registry import AdapterError, ExportContext, method_for_peft_type, method_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "AdapterError", "load_adapter", "save_adapter"]


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file written through `atomic_write_bytes`."""
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def save_adapter(
    out_dir: str | Path,
    spec: PeftSpec,
    state: Mapping[str, torch.Tensor],
    *,
    base_model: str,
    backbone: BackboneConfig,
) -> Path:
    """Write a task's adapter (state keyed `<anchor>.<param>`) as an adapter directory; returns it.

    `base_model` is what `base_model_name_or_path` names: a Hugging Face id or a directory."""
    out_dir = Path(out_dir)
    config, tensors = method_of(spec).export(spec, state, ExportContext(base_model, backbone))
    atomic_save_safetensors(tensors, out_dir / WEIGHTS_NAME, metadata={"format": "pt"})
    text = json.dumps(config, indent=2, sort_keys=True)
    atomic_write_bytes(out_dir / CONFIG_NAME, (text + "\n").encode())
    return out_dir


def load_adapter(adapter_dir: str | Path) -> tuple[PeftSpec, dict[str, torch.Tensor]]:
    """Read an adapter directory into (its method's config, state keyed `<anchor>.<param>`)."""
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterError(f"{path}: adapter file not found")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{config_path}: invalid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{config_path}: expected a JSON object")
    method = method_for_peft_type(raw.get("peft_type"), config_path)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{weights_path}: not a readable safetensors file: {exc}") from None
    return method.load(raw, tensors, config_path)
