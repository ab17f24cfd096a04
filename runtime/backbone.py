"""Loading a job's backbone and tokenizer, and greedy generation with a task's adapter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .layout import MicroBatchLayout
from .model_sources import resolve_model_dir
from .models import BackboneConfig, load_backbone
from .sharding import TensorSplit
from .tokenizer import TextTokenizer, load_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedBackbone:
    """A frozen backbone ready for PEFT attachment, with its tokenizer."""

    model: nn.Module
    config: BackboneConfig
    tokenizer: TextTokenizer
    model_dir: Path


def torch_device(device: str) -> torch.device:
    """The torch device for a plan's device name: `cpu`, or CUDA for `cuda` and GPU types."""
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: the plan needs a CUDA GPU and none is visible; compile for cpu")
    return torch.device("cuda")


def load_model(
    model: str,
    dtype: str = "fp32",
    device: str = "cpu",
    layers: range | None = None,
    split: TensorSplit | None = None,
) -> LoadedBackbone:
    """Resolve a spec's `model` value, load the weights in `dtype` onto `device`, and the
    tokenizer; with ``layers``, only those decoder layers (the rest stay on the meta device);
    with ``split``, one tensor-parallel shard of them."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model_dir = resolve_model_dir(model)
    tokenizer = load_tokenizer(model_dir)
    backbone, config = load_backbone(model_dir, DTYPES[dtype], device=torch_device(device), layers=layers, split=split)
    backbone.eval()
    for param in backbone.parameters():
        param.requires_grad_(False)
    return LoadedBackbone(backbone, config, tokenizer, model_dir)


@torch.no_grad()
def greedy_generate(loaded: LoadedBackbone, prompt: str, *, task: str | None = None, max_new_tokens: int = 32) -> str:
    """Greedy continuation of `prompt`, through `task`'s adapter when given (stops at EOS)."""
    ids = loaded.tokenizer.encode(prompt, add_special_tokens=True)
    device = next(loaded.model.parameters()).device
    new: list[int] = []
    for _ in range(max_new_tokens):
        seq = ids + new
        length = len(seq)
        logits = loaded.model(
            torch.tensor(seq, dtype=torch.long, device=device),
            torch.arange(length, dtype=torch.long, device=device),
            MicroBatchLayout.for_sequences([length], [task]),
        )
        token = int(logits[-1].argmax())
        if token == loaded.tokenizer.eos_token_id:
            break
        new.append(token)
    return loaded.tokenizer.decode(new)
