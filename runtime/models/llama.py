"""LLaMA-family backbone (llama, mistral, qwen2) with Hugging Face module names.

Legend: T tokens of the packed buffer, C hidden size, H query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..layout import MicroBatchLayout
from . import attention
from .config import BackboneConfig
from .layers import BackboneForCausalLM, HostEmbedding, HostLinear, RMSNorm, RotaryEmbedding, activation, apply_rotary


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with rotary positions."""

    def __init__(self, config: BackboneConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scaling = config.head_dim**-0.5
        self.sliding_window = config.sliding_window
        q_out = config.num_heads * config.head_dim
        kv_out = config.num_kv_heads * config.head_dim
        self.q_proj = HostLinear(config.hidden_size, q_out, bias=config.attention_bias)
        self.k_proj = HostLinear(config.hidden_size, kv_out, bias=config.attention_bias)
        self.v_proj = HostLinear(config.hidden_size, kv_out, bias=config.attention_bias)
        self.o_proj = HostLinear(q_out, config.hidden_size, bias=config.attention_out_bias)
        self.attention = attention.PackedAttention(
            config.num_heads, config.num_kv_heads, config.head_dim, self.scaling, config.sliding_window
        )

    def forward(self, x_TC: Tensor, cos_TD: Tensor, sin_TD: Tensor, layout: MicroBatchLayout) -> Tensor:
        q_THD = self.q_proj(x_TC, layout).view(-1, self.num_heads, self.head_dim)
        k_THD = self.k_proj(x_TC, layout).view(-1, self.num_kv_heads, self.head_dim)
        v_THD = self.v_proj(x_TC, layout).view(-1, self.num_kv_heads, self.head_dim)
        q_THD, k_THD = apply_rotary(q_THD, k_THD, cos_TD, sin_TD)
        out_THD = self.attention(q_THD, k_THD, v_THD, layout)
        return self.o_proj(out_THD.reshape(-1, self.num_heads * self.head_dim), layout)


class LlamaMLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.gate_proj = HostLinear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = HostLinear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = HostLinear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = activation(config.activation)

    def forward(self, x_TC: Tensor, layout: MicroBatchLayout) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x_TC, layout)) * self.up_proj(x_TC, layout), layout)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: BackboneConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, x_TC: Tensor, cos_TD: Tensor, sin_TD: Tensor, layout: MicroBatchLayout) -> Tensor:
        x_TC = x_TC + self.self_attn(self.input_layernorm(x_TC), cos_TD, sin_TD, layout)
        return x_TC + self.mlp(self.post_attention_layernorm(x_TC), layout)


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.embed_tokens = HostEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, input_ids_T: Tensor, position_ids_T: Tensor, layout: MicroBatchLayout) -> Tensor:
        x_TC = self.embed_tokens(input_ids_T, layout)
        cos_TD, sin_TD = self.rotary_emb(x_TC, position_ids_T)
        for layer in self.layers:
            x_TC = layer(x_TC, cos_TD, sin_TD, layout)
        return self.norm(x_TC)


class LlamaForCausalLM(BackboneForCausalLM):
    """LLaMA / Mistral / Qwen2 causal LM over packed buffers."""

    base_model_prefix = "model"

    def __init__(self, config: BackboneConfig) -> None:
        if config.family != "llama":
            raise ValueError(f"LlamaForCausalLM needs family 'llama', got {config.family!r}")
        super().__init__(config)
        self.model = LlamaModel(config)
        self.lm_head = HostLinear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def hidden_states(self, input_ids_T: Tensor, position_ids_T: Tensor, layout: MicroBatchLayout) -> Tensor:
        return self.model(input_ids_T, position_ids_T, layout)
