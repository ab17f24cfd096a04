"""Backbone configuration: one frozen dataclass for every supported model family.

`BackboneConfig.from_hf_dict` maps a Hugging Face `config.json` (model_type llama, mistral, qwen2,
gpt2, opt) onto it, using transformers' defaults for absent optional fields. `to_dict` is
JSON-able and stable (used for fingerprints); `from_dict` is its inverse.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["llama", "gpt2", "opt"]

FAMILIES: tuple[str, ...] = ("llama", "gpt2", "opt")
ACTIVATIONS: tuple[str, ...] = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")
LLAMA3_ROPE_KEYS: tuple[str, ...] = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)

TokenIds = int | tuple[int, ...] | None


@dataclass(frozen=True)
class BackboneConfig:
    """Architecture of a decoder-only backbone.

    `num_kv_heads` and `head_dim` default to `num_heads` and `hidden_size // num_heads`.
    `attention_bias` covers the q/k/v projections, `attention_out_bias` the output projection
    (they differ for qwen2). `rope_theta` is None for learned absolute positions (gpt2, opt).
    `rope_scaling` is None or a dict with `rope_type` in ("default", "linear", "llama3").
    `sliding_window` (mistral) limits how far back a token attends; None means unlimited.
    """

    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    model_type: str = ""
    norm_eps: float = 1e-5
    activation: str = "silu"
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    layer_norm_elementwise_affine: bool = True
    final_layer_norm: bool = True
    bos_token_id: TokenIds = None
    eos_token_id: TokenIds = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        if not self.model_type:
            object.__setattr__(self, "model_type", self.family)
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not supported (supported: {ACTIVATIONS})")
        if self.family == "llama":
            if self.rope_theta is None:
                raise ValueError("rope_theta is required for the llama family")
            if self.head_dim % 2:
                raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
            _check_rope_scaling(self.rope_scaling)
        else:
            if self.num_kv_heads != self.num_heads:
                raise ValueError(f"num_kv_heads must equal num_heads for the {self.family} family")
            if self.head_dim * self.num_heads != self.hidden_size:
                raise ValueError(f"head_dim * num_heads must equal hidden_size for the {self.family} family")
            if self.rope_theta is not None or self.rope_scaling is not None:
                raise ValueError(f"rope_theta/rope_scaling do not apply to the {self.family} family")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def enable_bias(self) -> bool:
        """OPT's single switch for all linear biases."""
        return self.attention_bias and self.attention_out_bias and self.mlp_bias

    @property
    def rope_type(self) -> str:
        """The rotary scaling type ("default" when unscaled)."""
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field (token id tuples become lists)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(sorted(value.items()))
            out[field.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneConfig:
        """Inverse of `to_dict`; unknown keys raise ValueError."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown BackboneConfig fields: {unknown}")
        return cls(**d)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> BackboneConfig:
        """Map a Hugging Face config.json dict; ValueError names an unsupported or missing field."""
        model_type = d.get("model_type")
        if model_type is None:
            raise ValueError("config has no 'model_type' field")
        if model_type in ("llama", "mistral", "qwen2"):
            return _from_hf_llama_like(d, model_type)
        if model_type == "gpt2":
            return _from_hf_gpt2(d)
        if model_type == "opt":
            return _from_hf_opt(d)
        raise ValueError(f"unsupported model_type {model_type!r} (supported: llama, mistral, qwen2, gpt2, opt)")


def _check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    if not scaling:
        return
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type {rope_type!r} is not supported (supported: {ROPE_TYPES})")
    if rope_type == "linear" and "factor" not in scaling:
        raise ValueError("rope_scaling.factor is required for linear rope scaling")
    if rope_type == "llama3":
        for key in LLAMA3_ROPE_KEYS:
            if key not in scaling:
                raise ValueError(f"rope_scaling.{key} is required for llama3 rope scaling")
    partial = scaling.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ValueError(f"rope_scaling.partial_rotary_factor {partial} is not supported")


def _require(d: dict[str, Any], *names: str) -> Any:
    """The first present of `names` (aliases), else ValueError naming the first."""
    for name in names:
        if d.get(name) is not None:
            return d[name]
    raise ValueError(f"config.json of model_type {d.get('model_type')!r} is missing field {names[0]!r}")


def _hf_rope(d: dict[str, Any], max_positions: int) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either the transformers-5 `rope_parameters` or the older
    `rope_theta` + `rope_scaling` layout."""
    params = d.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("rope_parameters per layer type are not supported")
    legacy = d.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    merged = {**legacy, **params}
    merged.pop("rope_theta", None)
    if "partial_rotary_factor" in d and d["partial_rotary_factor"] not in (None, 1.0):
        raise ValueError(f"partial_rotary_factor {d['partial_rotary_factor']} is not supported")
    rope_type = merged.pop("rope_type", merged.pop("type", "default"))
    if rope_type == "default":
        if set(merged) - {"partial_rotary_factor"}:
            raise ValueError(f"rope_scaling {merged} has no rope_type")
        merged.pop("partial_rotary_factor", None)
        return theta, None
    scaling = {"rope_type": rope_type, **merged}
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", max_positions)
    _check_rope_scaling(scaling)
    return theta, scaling


def _from_hf_llama_like(d: dict[str, Any], model_type: str) -> BackboneConfig:
    num_heads = int(_require(d, "num_attention_heads"))
    hidden = int(_require(d, "hidden_size"))
    max_positions = int(d.get("max_position_embeddings") or (32768 if model_type != "llama" else 2048))
    theta, scaling = _hf_rope(d, max_positions)
    sliding_window = None
    if model_type == "mistral":
        sliding_window = d.get("sliding_window", 4096)
    elif model_type == "qwen2":
        if d.get("use_sliding_window") and d.get("sliding_window") is not None:
            num_layers = int(_require(d, "num_hidden_layers"))
            layer_types = d.get("layer_types") or [
                "sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention"
                for i in range(num_layers)
            ]
            if any(t != "full_attention" for t in layer_types):
                raise ValueError("use_sliding_window is not supported for qwen2")
    if sliding_window is not None and sliding_window >= max_positions:
        sliding_window = None
    if model_type == "qwen2":
        qkv_bias, out_bias, mlp_bias = True, False, False
    elif model_type == "mistral":
        qkv_bias = out_bias = mlp_bias = False
    else:
        qkv_bias = out_bias = bool(d.get("attention_bias", False))
        mlp_bias = bool(d.get("mlp_bias", False))
    return BackboneConfig(
        family="llama",
        model_type=model_type,
        vocab_size=int(_require(d, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(_require(d, "num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
        head_dim=int(d.get("head_dim") or hidden // num_heads),
        intermediate_size=int(_require(d, "intermediate_size")),
        max_position_embeddings=max_positions,
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        activation=str(d.get("hidden_act", "silu")),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=sliding_window,
        attention_bias=qkv_bias,
        attention_out_bias=out_bias,
        mlp_bias=mlp_bias,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
    )


def _from_hf_gpt2(d: dict[str, Any]) -> BackboneConfig:
    if d.get("add_cross_attention"):
        raise ValueError("add_cross_attention is not supported for gpt2")
    hidden = int(_require(d, "n_embd", "hidden_size"))
    return BackboneConfig(
        family="gpt2",
        model_type="gpt2",
        vocab_size=int(_require(d, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(_require(d, "n_layer", "num_hidden_layers")),
        num_heads=int(_require(d, "n_head", "num_attention_heads")),
        intermediate_size=int(d.get("n_inner") or 4 * hidden),
        max_position_embeddings=int(d.get("n_positions") or d.get("max_position_embeddings") or 1024),
        norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
        activation=str(d.get("activation_function", "gelu_new")),
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        scale_attn_weights=bool(d.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(d.get("scale_attn_by_inverse_layer_idx", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
    )


def _from_hf_opt(d: dict[str, Any]) -> BackboneConfig:
    hidden = int(_require(d, "hidden_size"))
    enable_bias = bool(d.get("enable_bias", True))
    do_layer_norm_before = bool(d.get("do_layer_norm_before", True))
    return BackboneConfig(
        family="opt",
        model_type="opt",
        vocab_size=int(_require(d, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(_require(d, "num_hidden_layers")),
        num_heads=int(_require(d, "num_attention_heads")),
        intermediate_size=int(_require(d, "ffn_dim")),
        max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
        norm_eps=1e-5,
        activation=str(d.get("activation_function", "relu")),
        attention_bias=enable_bias,
        attention_out_bias=enable_bias,
        mlp_bias=enable_bias,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        do_layer_norm_before=do_layer_norm_before,
        word_embed_proj_dim=int(d.get("word_embed_proj_dim") or hidden),
        layer_norm_elementwise_affine=bool(d.get("layer_norm_elementwise_affine", True)),
        final_layer_norm=do_layer_norm_before and not d.get("_remove_final_layer_norm", False),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
    )
