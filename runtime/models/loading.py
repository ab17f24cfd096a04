"""Load a backbone from a Hugging Face directory (config.json + safetensors, sharded or not)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from .build import build_model
from .config import BackboneConfig
from .layers import BackboneForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Trailing key components of buffers that old checkpoints carry and our models derive.
_IGNORED_SUFFIXES: dict[str, tuple[tuple[str, ...], ...]] = {
    "gpt2": (("attn", "bias"), ("attn", "masked_bias")),
    "llama": (("rotary_emb", "inv_freq"),),
    "opt": (),
}
_MAX_LISTED = 5


def read_hf_config(path: str | Path) -> BackboneConfig:
    """BackboneConfig from `path/config.json`."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"missing {config_path}")
    with open(config_path, encoding="utf-8") as f:
        return BackboneConfig.from_hf_dict(json.load(f))


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (the index's shards, or model.safetensors)."""
    root = Path(path)
    index_path = root / INDEX_FILE
    if index_path.is_file():
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map")
        files = [root / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"missing shard {file} listed in {index_path}")
        return files
    single = root / SINGLE_FILE
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"missing {single} (and no {INDEX_FILE}) in {root}")


def _listed(keys: list[str]) -> str:
    head = ", ".join(keys[:_MAX_LISTED])
    more = f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return f"{len(keys)}: {head}{more}"


def _canonical_key(key: str, expected: set[str], prefix: str) -> str:
    """Map a checkpoint key to our name, adding the body prefix that some layouts omit."""
    if key in expected:
        return key
    prefixed = f"{prefix}.{key}"
    return prefixed if prefixed in expected else key


def _is_ignored(key: str, family: str) -> bool:
    parts = tuple(key.split("."))
    return any(parts[-len(suffix) :] == suffix for suffix in _IGNORED_SUFFIXES[family])


def assign_weights(
    model: BackboneForCausalLM,
    tensors: Mapping[str, Tensor],
    dtype: torch.dtype,
    source: str = "checkpoint",
) -> None:
    """Assign checkpoint tensors (Hugging Face key names) to `model`'s parameters, cast to
    `dtype`; the model may live on the meta device. Keys without the body prefix are accepted,
    derivable buffers and a tied lm_head are skipped. ValueError lists missing, unexpected and
    shape-mismatched keys (a few of each)."""
    tied = set(model.tied_weight_keys())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    expected = set(shapes)
    state: dict[str, Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for raw_key, tensor in tensors.items():
        key = _canonical_key(raw_key, expected, model.base_model_prefix)
        if key in tied or _is_ignored(key, model.config.family):
            continue
        if key not in expected:
            unexpected.append(raw_key)
        elif tuple(tensor.shape) != shapes[key]:
            mismatched.append(f"{raw_key} {tuple(tensor.shape)} != {shapes[key]}")
        else:
            state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    missing = sorted(expected - set(state))
    problems = []
    if missing:
        problems.append(f"missing tensors {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_listed(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches {_listed(mismatched)}")
    if problems:
        raise ValueError(f"{source} does not match {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    device = next(iter(state.values())).device
    model.reset_buffers(device)


def load_backbone(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> tuple[BackboneForCausalLM, BackboneConfig]:
    """Build the model on the meta device and assign the checkpoint's tensors cast to `dtype`.

    FileNotFoundError names a missing config/weights file; ValueError lists missing, unexpected
    and shape-mismatched tensor keys. A tied lm_head is taken from the embedding.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    config = read_hf_config(root)
    files = checkpoint_files(root)
    model = build_model(config, dtype=dtype, device="meta")
    tensors: dict[str, Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    assign_weights(model, tensors, dtype, source=f"checkpoint {root}")
    return model, config
