"""Construct a backbone model from its config."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

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
) -> BackboneForCausalLM:
    """Construct the family's model with randomly initialised parameters in `dtype` on `device`
    ("meta" allocates nothing). Rotary tables stay fp32."""
    model_cls = MODEL_CLASSES[config.family]
    skip = _initializers_skipped() if torch.device(device).type == "meta" else contextlib.nullcontext()
    with torch.device(device), skip:
        model = model_cls(config)
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
