"""Load a backbone from a Hugging Face directory (config.json + safetensors, sharded or not).

Every problem with a model file (unreadable or invalid JSON, unusable config fields, corrupt or
truncated safetensors, tensors that do not fit the model) is a ValueError or FileNotFoundError
naming the file. `check_checkpoint` finds the checkpoint's problems from the safetensors headers
alone, so the compiler reports them before a run starts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from muxtune.common.text import clip_line

from ..sharding import TensorSplit
from .build import build_model
from .config import BackboneConfig
from .layers import BackboneForCausalLM
from .tensor_parallel import local_shape, read_part

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Trailing key components of buffers that old checkpoints carry and our models derive.
_IGNORED_SUFFIXES: dict[str, tuple[tuple[str, ...], ...]] = {
    "gpt2": (("attn", "bias"), ("attn", "masked_bias")),
    "llama": (("rotary_emb", "inv_freq"),),
    "opt": (),
}
_MAX_LISTED = 5
MAX_INT_DIGITS = 4300
"""Digits a JSON integer may have (Python's default limit for converting decimal text to int)."""
_MAX_KEY_CHARS = 120
_MESSAGE_CHARS = 300
# What a hostile config.json value can make the field mapping or the model constructor raise.
_CONFIG_ERRORS = (ValueError, TypeError, KeyError, AttributeError, ArithmeticError)
_BUILD_ERRORS = (RuntimeError, TypeError, ValueError, OverflowError)


class TensorInfo(NamedTuple):
    """What matching a checkpoint tensor to a model needs: its shape and whether it is floating point."""

    shape: tuple[int, ...]
    floating: bool


def _first_line(exc: BaseException, limit: int = _MESSAGE_CHARS) -> str:
    lines = str(exc).strip().splitlines()
    return clip_line(lines[0] if lines else type(exc).__name__, limit)


def _bounded_int(text: str) -> int:
    """json's `parse_int` hook: an integer literal, refusing more digits than Python converts."""
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"a number has {digits} digits (at most {MAX_INT_DIGITS} are accepted)")
    return int(text)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object stored in `path`; ValueError naming the file when it cannot be read, is
    not UTF-8 JSON or holds something other than an object."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"), parse_int=_bounded_int)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8 text (byte {exc.start + 1})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"{path}: invalid JSON: nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"{path}: invalid JSON: {_first_line(exc)}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_hf_config(path: str | Path) -> BackboneConfig:
    """BackboneConfig from `path/config.json`; errors name the file."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"missing {config_path}")
    data = read_json_object(config_path)
    try:
        return BackboneConfig.from_hf_dict(data)
    except _CONFIG_ERRORS as exc:
        kind = "" if isinstance(exc, ValueError) else "a field has an unusable value: "
        raise ValueError(f"{config_path}: {kind}{_first_line(exc)}") from None


def build_model_checked(
    config: BackboneConfig,
    config_path: Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "meta",
    split: TensorSplit | None = None,
) -> BackboneForCausalLM:
    """`build_model`, with a ValueError naming `config_path` when its sizes cannot make a model."""
    try:
        return build_model(config, dtype=dtype, device=device, split=split)
    except _BUILD_ERRORS as exc:
        raise ValueError(f"{config_path}: these sizes do not make a model: {_first_line(exc)}") from None


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (the index's shards, or model.safetensors)."""
    root = Path(path)
    index_path = root / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: has no weight_map (a non-empty object of tensor name -> file)")
        names = list(dict.fromkeys(weight_map.values()))
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"{index_path}: weight_map values must be file names, got {type(name).__name__}")
        files = [root / name for name in names]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"missing shard {file} listed in {index_path}")
        return files
    single = root / SINGLE_FILE
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"missing {single} (and no {INDEX_FILE}) in {root}")


def _short(key: str) -> str:
    return key if len(key) <= _MAX_KEY_CHARS else f"{key[:_MAX_KEY_CHARS]}..."


def _listed(keys: list[str]) -> str:
    head = ", ".join(_short(k) for k in keys[:_MAX_LISTED])
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


def match_checkpoint(
    model: BackboneForCausalLM,
    tensors: Mapping[str, TensorInfo],
    source: str,
    skipped: Callable[[str], bool] | None = None,
) -> dict[str, str]:
    """The model state key each checkpoint tensor (Hugging Face key name) fills, judged by names,
    shapes and floating-point-ness alone. Keys without the body prefix are accepted, derivable
    buffers and a tied lm_head are skipped, and so are the state keys ``skipped`` selects (they
    may be absent). ValueError, starting with `source`, lists missing, unexpected,
    shape-mismatched and non-floating keys (a few of each)."""
    tied = set(model.tied_weight_keys())
    expected = {k: TensorInfo(tuple(v.shape), v.is_floating_point()) for k, v in model.state_dict().items()}
    expected = {k: info for k, info in expected.items() if k not in tied}
    names = set(expected)
    mapping: dict[str, str] = {}
    present: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    wrong_kind: list[str] = []
    for raw_key, info in tensors.items():
        key = _canonical_key(raw_key, names, model.base_model_prefix)
        if key in tied or _is_ignored(key, model.config.family):
            continue
        if key not in expected:
            unexpected.append(raw_key)
            continue
        present.add(key)
        if skipped is not None and skipped(key):
            continue
        if tuple(info.shape) != expected[key].shape:
            mismatched.append(clip_line(f"{_short(raw_key)} {tuple(info.shape)} != {expected[key].shape}", 200))
        elif info.floating != expected[key].floating:
            wrong_kind.append(raw_key)
        else:
            mapping[raw_key] = key
    missing = sorted(k for k in names - present if skipped is None or not skipped(k))
    problems = []
    if missing:
        problems.append(f"missing tensors {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_listed(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches {_listed(mismatched)}")
    if wrong_kind:
        problems.append(f"tensors of the wrong kind (integer vs floating point) {_listed(sorted(wrong_kind))}")
    if problems:
        raise ValueError(f"{source}: the tensors do not match {type(model).__name__}: " + "; ".join(problems))
    return mapping


def assign_weights(
    model: BackboneForCausalLM,
    tensors: Mapping[str, Tensor],
    dtype: torch.dtype,
    source: str = "checkpoint",
    skipped: Callable[[str], bool] | None = None,
) -> None:
    """Assign checkpoint tensors (Hugging Face key names) to `model`'s parameters, cast to
    `dtype`; the model may live on the meta device. Matching follows `match_checkpoint`
    (ValueError listing what does not fit); the keys ``skipped`` selects stay as they are."""
    infos = {k: TensorInfo(tuple(t.shape), t.is_floating_point()) for k, t in tensors.items()}
    mapping = match_checkpoint(model, infos, source, skipped)
    state: dict[str, Tensor] = {}
    for raw_key, key in mapping.items():
        tensor = tensors[raw_key]
        state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    device = next(iter(state.values())).device
    model.reset_buffers(device)


def _unreadable(file: Path, exc: BaseException) -> ValueError:
    return ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {_first_line(exc)}")


def _is_floating_dtype(name: str) -> bool:
    """Whether a safetensors dtype name (F32, BF16, F8_E4M3, I64, BOOL, ...) is floating point."""
    return name.startswith(("F", "BF"))


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Every tensor's shape and kind from a safetensors file's header, without reading the data.

    safetensors checks the header and that the data offsets cover the file exactly, so a
    truncated or garbage file is a ValueError naming it."""
    try:
        with safe_open(str(file), framework="pt") as f:
            infos = {}
            for key in f.keys():
                tensor_slice = f.get_slice(key)
                infos[key] = TensorInfo(tuple(tensor_slice.get_shape()), _is_floating_dtype(tensor_slice.get_dtype()))
            return infos
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise _unreadable(file, exc) from None


def check_checkpoint(path: str | Path, model: BackboneForCausalLM) -> None:
    """Check a checkpoint directory's safetensors files against `model` (built on the meta
    device) from their headers alone: each file is intact, and the tensors' names, shapes and
    kinds are what `load_backbone` needs. ValueError/FileNotFoundError names the file."""
    root = Path(path)
    files = checkpoint_files(root)
    infos: dict[str, TensorInfo] = {}
    for file in files:
        infos.update(read_safetensors_header(file))
    source = str(files[0]) if len(files) == 1 else str(root / INDEX_FILE)
    match_checkpoint(model, infos, source)


def decoder_layer_prefix(model: BackboneForCausalLM) -> str:
    """The state-key prefix of the model's decoder layers (``model.layers``, ``transformer.h``):
    the module list holding ``num_layers`` blocks."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == model.config.num_layers:
            return name
    raise ValueError(f"{type(model).__name__} has no list of {model.config.num_layers} decoder layers")


def outside_layers(model: BackboneForCausalLM, layers: range) -> Callable[[str], bool]:
    """A predicate on state keys: True for the parameters of decoder layers not in ``layers``."""
    prefix = decoder_layer_prefix(model) + "."

    def outside(key: str) -> bool:
        if not key.startswith(prefix):
            return False
        return int(key[len(prefix) :].split(".", 1)[0]) not in layers

    return outside


def load_backbone(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    layers: range | None = None,
    split: TensorSplit | None = None,
) -> tuple[BackboneForCausalLM, BackboneConfig]:
    """Build the model on the meta device and assign the checkpoint's tensors cast to `dtype`.

    With ``layers`` (a pipeline stage's decoder layers), the other decoder layers are neither
    read nor allocated: their parameters stay on the meta device. Embeddings, final norm and
    head are always loaded. With ``split``, one tensor-parallel shard: each split tensor's part
    alone is read. FileNotFoundError names a missing config/weights file; ValueError
    names an unreadable file or lists missing, unexpected and shape-mismatched tensor keys. A
    tied lm_head is taken from the embedding.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    config = read_hf_config(root)
    files = checkpoint_files(root)
    model = build_model_checked(config, root / "config.json", dtype=dtype, split=split)
    skipped = outside_layers(model, layers) if layers is not None else None
    names = set(model.state_dict()) if split is not None else set()

    def model_key(key: str) -> str:
        return _canonical_key(key, names, model.base_model_prefix)

    infos: dict[str, TensorInfo] = {}
    if skipped is not None:
        for file in files:
            infos.update(read_safetensors_header(file))
        if split is not None:
            infos = {k: TensorInfo(local_shape(model, model_key(k), v.shape), v.floating) for k, v in infos.items()}
        wanted = set(match_checkpoint(model, infos, f"checkpoint {root}", skipped))
    tensors: dict[str, Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if skipped is not None and key not in wanted:
                        continue
                    tensors[key] = (
                        f.get_tensor(key) if split is None else read_part(model, model_key(key), f.get_slice(key))
                    )
        except (SafetensorError, OSError) as exc:
            raise _unreadable(file, exc) from None
    assign_weights(model, tensors, dtype, source=f"checkpoint {root}", skipped=skipped)
    return model, config
