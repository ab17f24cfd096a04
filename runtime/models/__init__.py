"""muxtune.runtime.models: the backbone families (our own fx-traceable torch modules whose
parameter names match Hugging Face checkpoints) and their loader."""

from .attention import PackedAttention, packed_causal_attention
from .build import MODEL_CLASSES, build_model
from .config import BackboneConfig
from .gpt2 import GPT2LMHeadModel
from .layers import BackboneForCausalLM, Conv1D, HostConv1D, HostEmbedding, HostLinear, RMSNorm, RotaryEmbedding
from .llama import LlamaForCausalLM
from .loading import assign_weights, load_backbone, read_hf_config
from .opt import OPTForCausalLM

__all__ = [
    "BackboneConfig",
    "BackboneForCausalLM",
    "Conv1D",
    "GPT2LMHeadModel",
    "HostConv1D",
    "HostEmbedding",
    "HostLinear",
    "LlamaForCausalLM",
    "MODEL_CLASSES",
    "OPTForCausalLM",
    "PackedAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "assign_weights",
    "build_model",
    "load_backbone",
    "packed_causal_attention",
    "read_hf_config",
]
