"""Models of `muxtune-bench` made up on the spot: ``random:NAME``, a transformers LLaMA checkpoint
with seeded random bf16 weights and the bundled SmolLM2 tokenizer (vocabulary 49,152), and the
parameter count model FLOP utilization is computed from (`flop_parameters`).

- ``random:llama-1b``: hidden 2048, 16 layers, 32 heads, 8 KV heads (head dim 64), intermediate
  8192, tied embeddings: 1,073,809,408 parameters (973,146,112 outside the embedding, which is
  49,152 x 2048 = 100,663,296); 2.1 GB of bf16 weights;
- ``random:llama-tiny``: hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 256, tied:
  3,268,928 parameters (123,200 outside the embedding), for tests.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from muxtune.common.files import apply_umask_mode, atomic_write_text

RANDOM_PREFIX = "random:"
TOKENIZER_SOURCE = "builtin:smollm2-135m"
SEED = 1234
INIT_STD = 0.02
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "wpe.weight", "embed_positions.weight")
TOKEN_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight")
HEAD = "lm_head.weight"


@dataclass(frozen=True)
class RandomModel:
    """The shape of a ``random:NAME`` model and its exact parameter count (checked by the tests)."""

    label: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    parameters: int


RANDOM_MODELS = {
    "llama-1b": RandomModel("random:llama-1b (LLaMA 1.07B, random weights)", 2048, 16, 32, 8, 8192, 1_073_809_408),
    "llama-tiny": RandomModel("random:llama-tiny (LLaMA 3.3M, random weights)", 64, 2, 4, 2, 256, 3_268_928),
}


def random_model_config(model: RandomModel, tokenizer_config: dict) -> dict:
    """The transformers config.json of ``model``; vocabulary and special tokens from the tokenizer's model."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tokenizer_config["vocab_size"],
        "hidden_size": model.hidden,
        "intermediate_size": model.intermediate,
        "num_hidden_layers": model.layers,
        "num_attention_heads": model.heads,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.hidden // model.heads,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer_config.get("bos_token_id", 1),
        "eos_token_id": tokenizer_config.get("eos_token_id", 2),
        "pad_token_id": tokenizer_config.get("pad_token_id", 2),
        "torch_dtype": "bfloat16",
    }


def random_weights(config: dict, seed: int = SEED) -> dict[str, torch.Tensor]:
    """Seeded random bf16 weights for a LLaMA ``config``, made tensor by tensor (never a full fp32
    copy): norms 1, every other weight normal with std 0.02. Names and shapes come from
    transformers' model built on the meta device; a tied head is left out, as transformers saves it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(LlamaConfig(**config)).state_dict().items()}
    if config["tie_word_embeddings"]:
        shapes.pop(HEAD, None)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in sorted(shapes):
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
        else:
            value = torch.empty(shapes[name], dtype=torch.float32).normal_(0.0, INIT_STD, generator=generator)
            tensors[name] = value.to(torch.bfloat16)
    return tensors


def write_random_model(name: str, out_dir: Path) -> Path:
    """Write ``random:NAME`` to ``out_dir`` (once: a directory with its config.json is reused);
    raises KeyError for an unknown name."""
    from muxtune.runtime.model_sources import resolve_model_dir

    from .truncate_model import CONFIG_FILES

    model = RANDOM_MODELS[name]
    if (out_dir / "config.json").is_file():
        return out_dir
    source = resolve_model_dir(TOKENIZER_SOURCE)
    config = random_model_config(model, json.loads((source / "config.json").read_text()))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(random_weights(config), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    apply_umask_mode(out_dir / "model.safetensors")
    for file in CONFIG_FILES:
        if (source / file).exists():
            shutil.copyfile(source / file, out_dir / file)
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")  # last: marks it complete
    return out_dir


def flop_parameters(model_dir: Path) -> int:
    """The parameters model FLOP utilization counts: every weight but the embeddings (lookups, no
    multiplications), plus the output head, counted whether or not it is tied to the token
    embedding (its vocabulary x hidden matmul runs either way). For a tied LLaMA model this is its
    parameter count."""
    shapes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as weights:
            for name in weights.keys():
                shapes[name] = weights.get_slice(name).get_shape()
    embeddings = {name for name in shapes if name.endswith(EMBEDDING_SUFFIXES)}
    total = sum(math.prod(shape) for name, shape in shapes.items() if name not in embeddings)
    if HEAD not in shapes:
        token = [name for name in embeddings if name.endswith(TOKEN_EMBEDDING_SUFFIXES)]
        total += math.prod(shapes[token[0]]) if token else 0
    return total
