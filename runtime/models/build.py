"""Construct a backbone model from its config."""

from __future__ import annotations

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
    with torch.device(device):
        model = model_cls(config)
    model.to(dtype=dtype)
    model.reset_buffers()
    return model
