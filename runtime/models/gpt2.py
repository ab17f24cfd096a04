"""GPT-2 backbone with Hugging Face module names (fused c_attn, Conv1D projections).

Legend: T tokens of the packed buffer, C hidden size, H heads, D head dim.
"""

from __future__ import annotations

import torch.fx
from torch import Tensor, nn

from ..layout import MicroBatchLayout
from . import attention
from .config import BackboneConfig
from .layers import BackboneForCausalLM, HostConv1D, HostEmbedding, HostLinear, activation, output_layout, output_rows

torch.fx.wrap("output_rows")
torch.fx.wrap("output_layout")


class GPT2Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection; in the last layer, c_proj runs on
    the layout's output rows only."""

    def __init__(self, config: BackboneConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.last = layer_idx == config.num_layers - 1
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        scaling = config.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scaling /= float(layer_idx + 1)
        self.scaling = scaling
        self.c_attn = HostConv1D(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = HostConv1D(config.hidden_size, config.hidden_size)
        self.attention = attention.PackedAttention(config.num_heads, config.num_heads, config.head_dim, scaling)

    def forward(self, x_TC: Tensor, layout: MicroBatchLayout) -> Tensor:
        q_TC, k_TC, v_TC = self.c_attn(x_TC, layout).split(self.hidden_size, dim=1)
        out_THD = self.attention(
            q_TC.view(-1, self.num_heads, self.head_dim),
            k_TC.view(-1, self.num_heads, self.head_dim),
            v_TC.view(-1, self.num_heads, self.head_dim),
            layout,
        )
        out_TC = out_THD.reshape(-1, self.hidden_size)
        if self.last:
            return self.c_proj(output_rows(out_TC, layout), output_layout(layout))
        return self.c_proj(out_TC, layout)


class GPT2MLP(nn.Module):
    """c_proj(act(c_fc(x)))."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.c_fc = HostConv1D(config.hidden_size, config.intermediate_size)
        self.c_proj = HostConv1D(config.intermediate_size, config.hidden_size)
        self.act = activation(config.activation)

    def forward(self, x_TC: Tensor, layout: MicroBatchLayout) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x_TC, layout)), layout)


class GPT2Block(nn.Module):
    """Pre-LayerNorm block; the last returns the layout's output rows only (`output_rows`)."""

    def __init__(self, config: BackboneConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x_TC: Tensor, layout: MicroBatchLayout) -> Tensor:
        residual_TC, after = x_TC, layout
        if self.attn.last:
            residual_TC, after = output_rows(x_TC, layout), output_layout(layout)
        x_TC = residual_TC + self.attn(self.ln_1(x_TC), layout)
        return x_TC + self.mlp(self.ln_2(x_TC), after)


class GPT2Model(nn.Module):
    """Token and learned position embeddings, blocks, final LayerNorm."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.wte = HostEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, input_ids_T: Tensor, position_ids_T: Tensor, layout: MicroBatchLayout) -> Tensor:
        x_TC = self.wte(input_ids_T, layout) + self.wpe(position_ids_T)
        for block in self.h:
            x_TC = block(x_TC, layout)
        return self.ln_f(x_TC)


class GPT2LMHeadModel(BackboneForCausalLM):
    """GPT-2 causal LM over packed buffers; lm_head is tied to wte by default."""

    base_model_prefix = "transformer"

    def __init__(self, config: BackboneConfig) -> None:
        if config.family != "gpt2":
            raise ValueError(f"GPT2LMHeadModel needs family 'gpt2', got {config.family!r}")
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.lm_head = HostLinear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def hidden_states(self, input_ids_T: Tensor, position_ids_T: Tensor, layout: MicroBatchLayout) -> Tensor:
        return self.transformer(input_ids_T, position_ids_T, layout)
