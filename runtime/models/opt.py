"""OPT backbone with Hugging Face module names.

Legend: T tokens of the packed buffer, C hidden size, E word embedding size, H heads, D head dim.
"""

from __future__ import annotations

import torch.fx
from torch import Tensor, nn

from ..layout import MicroBatchLayout
from . import attention
from .config import BackboneConfig
from .layers import BackboneForCausalLM, HostEmbedding, HostLinear, activation, output_layout, output_rows

torch.fx.wrap("output_rows")
torch.fx.wrap("output_layout")


class OPTLearnedPositionalEmbedding(nn.Embedding):
    """Learned positions stored with an offset of 2 rows (position p reads row p + 2)."""

    offset = 2

    def __init__(self, num_positions: int, embedding_dim: int) -> None:
        super().__init__(num_positions + self.offset, embedding_dim)

    def forward(self, position_ids: Tensor) -> Tensor:
        return super().forward(position_ids + self.offset)


class OPTAttention(nn.Module):
    """Multi-head self-attention; queries are scaled right after q_proj, as in OPT. In the last
    layer, out_proj runs on the layout's output rows only."""

    def __init__(self, config: BackboneConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.last = layer_idx == config.num_layers - 1
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scaling = config.head_dim**-0.5
        c = config.hidden_size
        self.k_proj = HostLinear(c, c, bias=config.attention_bias)
        self.v_proj = HostLinear(c, c, bias=config.attention_bias)
        self.q_proj = HostLinear(c, c, bias=config.attention_bias)
        self.out_proj = HostLinear(c, c, bias=config.attention_out_bias)
        self.attention = attention.PackedAttention(config.num_heads, config.num_heads, config.head_dim, scale=1.0)

    def forward(self, x_TC: Tensor, layout: MicroBatchLayout) -> Tensor:
        q_THD = (self.q_proj(x_TC, layout) * self.scaling).view(-1, self.num_heads, self.head_dim)
        k_THD = self.k_proj(x_TC, layout).view(-1, self.num_heads, self.head_dim)
        v_THD = self.v_proj(x_TC, layout).view(-1, self.num_heads, self.head_dim)
        out_TC = self.attention(q_THD, k_THD, v_THD, layout).reshape(-1, self.hidden_size)
        if self.last:
            return self.out_proj(output_rows(out_TC, layout), output_layout(layout))
        return self.out_proj(out_TC, layout)


class OPTDecoderLayer(nn.Module):
    """Attention and ReLU MLP, each with a LayerNorm before (do_layer_norm_before) or after; the
    last layer returns the layout's output rows only (`output_rows`)."""

    def __init__(self, config: BackboneConfig, layer_idx: int) -> None:
        super().__init__()
        c, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(c, eps=config.norm_eps, elementwise_affine=affine)
        self.fc1 = HostLinear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.fc2 = HostLinear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.final_layer_norm = nn.LayerNorm(c, eps=config.norm_eps, elementwise_affine=affine)
        self.activation_fn = activation(config.activation)

    def forward(self, x_TC: Tensor, layout: MicroBatchLayout) -> Tensor:
        residual_TC, after = x_TC, layout
        if self.self_attn.last:
            residual_TC, after = output_rows(x_TC, layout), output_layout(layout)
        if self.do_layer_norm_before:
            x_TC = residual_TC + self.self_attn(self.self_attn_layer_norm(x_TC), layout)
            return x_TC + self.fc2(self.activation_fn(self.fc1(self.final_layer_norm(x_TC), after)), after)
        x_TC = self.self_attn_layer_norm(residual_TC + self.self_attn(x_TC, layout))
        return self.final_layer_norm(x_TC + self.fc2(self.activation_fn(self.fc1(x_TC, after)), after))


class OPTDecoder(nn.Module):
    """Embeddings (with optional projections in and out), layers and optional final norm."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        c, e = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = HostEmbedding(config.vocab_size, e)
        self.embed_positions = OPTLearnedPositionalEmbedding(config.max_position_embeddings, c)
        self.project_out = HostLinear(c, e, bias=False) if e != c else None
        self.project_in = HostLinear(e, c, bias=False) if e != c else None
        self.final_layer_norm = (
            nn.LayerNorm(c, eps=config.norm_eps, elementwise_affine=config.layer_norm_elementwise_affine)
            if config.final_layer_norm
            else None
        )
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i) for i in range(config.num_layers))

    def forward(self, input_ids_T: Tensor, position_ids_T: Tensor, layout: MicroBatchLayout) -> Tensor:
        x = self.embed_tokens(input_ids_T, layout)
        if self.project_in is not None:
            x = self.project_in(x, layout)
        x_TC = x + self.embed_positions(position_ids_T)
        for layer in self.layers:
            x_TC = layer(x_TC, layout)
        if self.final_layer_norm is not None:
            x_TC = self.final_layer_norm(x_TC)
        if self.project_out is not None:
            x_TC = self.project_out(x_TC, output_layout(layout))
        return x_TC


class OPTModel(nn.Module):
    """Holds the decoder (checkpoint prefix `model.decoder`)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config)

    def forward(self, input_ids_T: Tensor, position_ids_T: Tensor, layout: MicroBatchLayout) -> Tensor:
        return self.decoder(input_ids_T, position_ids_T, layout)


class OPTForCausalLM(BackboneForCausalLM):
    """OPT causal LM over packed buffers; hidden_states returns [T, word_embed_proj_dim]."""

    base_model_prefix = "model"

    def __init__(self, config: BackboneConfig) -> None:
        if config.family != "opt":
            raise ValueError(f"OPTForCausalLM needs family 'opt', got {config.family!r}")
        super().__init__(config)
        self.model = OPTModel(config)
        self.lm_head = HostLinear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    def hidden_states(self, input_ids_T: Tensor, position_ids_T: Tensor, layout: MicroBatchLayout) -> Tensor:
        return self.model(input_ids_T, position_ids_T, layout)
