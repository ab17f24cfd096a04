"""LLaMA-family backbone (llama, mistral, qwen2) with Hugging Face module names.

Legend: T tokens of the packed buffer, C hidden size, H query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import torch.fx
from torch import Tensor, nn

from ..layout import MicroBatchLayout
from ..sharding import HostShard, TensorSplit
from . import attention
from .config import BackboneConfig
from .layers import (
    BackboneForCausalLM,
    HostEmbedding,
    HostLinear,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    gated_activation,
    output_layout,
    output_rows,
)
from .tensor_parallel import check_split, enter_tensor_parallel, leave_tensor_parallel, split_linear

torch.fx.wrap("enter_tensor_parallel")
torch.fx.wrap("leave_tensor_parallel")
torch.fx.wrap("output_rows")
torch.fx.wrap("output_layout")


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with rotary positions; with a `TensorSplit`, this shard's
    heads only (q/k/v column-parallel, o row-parallel: its output is a partial sum). In the
    last layer, o_proj runs on the layout's output rows only."""

    def __init__(self, config: BackboneConfig, layer_idx: int, split: TensorSplit | None = None) -> None:
        super().__init__()
        parts = split.size if split is not None else 1
        if split is not None:
            check_split(
                "attention",
                {"num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads},
                split,
            )
        self.layer_idx = layer_idx
        self.last = layer_idx == config.num_layers - 1
        self.num_heads = config.num_heads // parts
        self.num_kv_heads = config.num_kv_heads // parts
        self.head_dim = config.head_dim
        self.scaling = config.head_dim**-0.5
        self.sliding_window = config.sliding_window
        q_out = self.num_heads * config.head_dim
        kv_out = self.num_kv_heads * config.head_dim
        self.q_proj = split_linear(HostLinear(config.hidden_size, q_out, bias=config.attention_bias), "column", split)
        self.k_proj = split_linear(HostLinear(config.hidden_size, kv_out, bias=config.attention_bias), "column", split)
        self.v_proj = split_linear(HostLinear(config.hidden_size, kv_out, bias=config.attention_bias), "column", split)
        self.o_proj = split_linear(HostLinear(q_out, config.hidden_size, bias=config.attention_out_bias), "row", split)
        self.attention = attention.PackedAttention(
            self.num_heads, self.num_kv_heads, config.head_dim, self.scaling, config.sliding_window
        )
        if split is not None:
            self.attention.tensor_shard = HostShard("heads", split, q_out * parts, kv_out * parts)

    def forward(self, x_TC: Tensor, cos_TD: Tensor, sin_TD: Tensor, layout: MicroBatchLayout) -> Tensor:
        q_THD = self.q_proj(x_TC, layout).view(-1, self.num_heads, self.head_dim)
        k_THD = self.k_proj(x_TC, layout).view(-1, self.num_kv_heads, self.head_dim)
        v_THD = self.v_proj(x_TC, layout).view(-1, self.num_kv_heads, self.head_dim)
        q_THD, k_THD = apply_rotary(q_THD, k_THD, cos_TD, sin_TD)
        out_TC = self.attention(q_THD, k_THD, v_THD, layout).reshape(-1, self.num_heads * self.head_dim)
        if self.last:
            return self.o_proj(output_rows(out_TC, layout), output_layout(layout))
        return self.o_proj(out_TC, layout)


class LlamaMLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); with a `TensorSplit`, this shard's intermediate
    features only (gate/up column-parallel, down row-parallel: its output is a partial sum)."""

    def __init__(self, config: BackboneConfig, split: TensorSplit | None = None) -> None:
        super().__init__()
        if split is not None:
            check_split("mlp", {"intermediate_size": config.intermediate_size}, split)
        width = config.intermediate_size // (split.size if split is not None else 1)
        self.gate_proj = split_linear(HostLinear(config.hidden_size, width, bias=config.mlp_bias), "column", split)
        self.up_proj = split_linear(HostLinear(config.hidden_size, width, bias=config.mlp_bias), "column", split)
        self.down_proj = split_linear(HostLinear(width, config.hidden_size, bias=config.mlp_bias), "row", split)
        self.activation = config.activation

    def forward(self, x_TC: Tensor, layout: MicroBatchLayout) -> Tensor:
        gated = gated_activation(self.gate_proj(x_TC, layout), self.up_proj(x_TC, layout), self.activation)
        return self.down_proj(gated, layout)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); with a `TensorSplit`, attention
    and MLP each enter and leave the tensor-parallel group (see `tensor_parallel`). The last
    layer returns the layout's output rows only (`output_rows`)."""

    def __init__(self, config: BackboneConfig, layer_idx: int, split: TensorSplit | None = None) -> None:
        super().__init__()
        self.split = split
        self.self_attn = LlamaAttention(config, layer_idx, split)
        self.mlp = LlamaMLP(config, split)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, x_TC: Tensor, cos_TD: Tensor, sin_TD: Tensor, layout: MicroBatchLayout) -> Tensor:
        residual_TC, after = x_TC, layout
        if self.self_attn.last:
            residual_TC, after = output_rows(x_TC, layout), output_layout(layout)
        if self.split is None:
            x_TC = residual_TC + self.self_attn(self.input_layernorm(x_TC), cos_TD, sin_TD, layout)
            return x_TC + self.mlp(self.post_attention_layernorm(x_TC), after)
        attended = self.self_attn(enter_tensor_parallel(self.input_layernorm(x_TC)), cos_TD, sin_TD, layout)
        x_TC = residual_TC + leave_tensor_parallel(attended)
        mixed = self.mlp(enter_tensor_parallel(self.post_attention_layernorm(x_TC)), after)
        return x_TC + leave_tensor_parallel(mixed)


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm."""

    def __init__(self, config: BackboneConfig, split: TensorSplit | None = None) -> None:
        super().__init__()
        self.embed_tokens = HostEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, split) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, input_ids_T: Tensor, position_ids_T: Tensor, layout: MicroBatchLayout) -> Tensor:
        x_TC = self.embed_tokens(input_ids_T, layout)
        cos_TD, sin_TD = self.rotary_emb(x_TC, position_ids_T)
        for layer in self.layers:
            x_TC = layer(x_TC, cos_TD, sin_TD, layout)
        return self.norm(x_TC)


class LlamaForCausalLM(BackboneForCausalLM):
    """LLaMA / Mistral / Qwen2 causal LM over packed buffers; with a `TensorSplit`, one shard of
    a tensor-parallel group (decoder layers split, embeddings, norms and head whole)."""

    base_model_prefix = "model"
    splittable = True

    def __init__(self, config: BackboneConfig, split: TensorSplit | None = None) -> None:
        if config.family != "llama":
            raise ValueError(f"LlamaForCausalLM needs family 'llama', got {config.family!r}")
        super().__init__(config)
        self.model = LlamaModel(config, split)
        self.lm_head = HostLinear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def hidden_states(self, input_ids_T: Tensor, position_ids_T: Tensor, layout: MicroBatchLayout) -> Tensor:
        return self.model(input_ids_T, position_ids_T, layout)
