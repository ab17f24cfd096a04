"""Construct a backbone model from its config."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..sharding import TensorSplit
from .config import BackboneConfig
from .gpt2 import GPT2LMHeadModel
from .layers import BackboneForCausalLM
from .llama import LlamaForCausalLM
from .opt import OPTForCausalLM

MODEL_CLASSES: dict[str, type[BackboneForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "opt": OPTForCausalLM,
}


def build_model(
    config: BackboneConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    split: TensorSplit | None = None,
) -> BackboneForCausalLM:
    """Construct the family's model with randomly initialised parameters in `dtype` on `device`
    ("meta" allocates nothing); with ``split``, one tensor-parallel shard of it (ValueError for
    a family without tensor parallelism or widths that do not split). Rotary tables stay fp32."""
    model_cls = MODEL_CLASSES[config.family]
    if split is not None and not model_cls.splittable:
        raise ValueError(f"the {config.family} family has no tensor-parallel layers (the llama family has)")
    skip = _initializers_skipped() if torch.device(device).type == "meta" else contextlib.nullcontext()
    with torch.device(device), skip:
        model = model_cls(config) if split is None else model_cls(config, split=split)
    model.to(dtype=dtype)
    model.reset_buffers()
    return model


_INITIALIZERS = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_", "xavier_uniform_")


@contextlib.contextmanager
def _initializers_skipped() -> Iterator[None]:
    """`torch.nn.init`'s fills as no-ops: a meta tensor holds no values, and filling one runs
    torch's Python decompositions (the first call imports the whole compiler stack, ~1.5 s)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALIZERS}
    try:
        for name in _INITIALIZERS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)
