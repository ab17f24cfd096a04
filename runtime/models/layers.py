"""Building blocks shared by the backbone families.

Legend: T tokens of a packed buffer, I / O input / output features, H heads, D head dim.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from muxtune.kernels.cpu_fused import rms_norm, rotary, silu_and_mul

from ..layout import MicroBatchLayout, host_to_device
from ..peft.base import AttachmentKind, InputPrefixModule, OperatorHost, PeftHost
from .config import BackboneConfig

torch.fx.wrap("rms_norm")
torch.fx.wrap("rotary")
torch.fx.wrap("silu_and_mul")


class RMSNorm(nn.Module):
    """Root-mean-square norm with Hugging Face numerics (statistics in fp32; one fused kernel on
    the CPU, `muxtune.kernels.cpu_fused`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class Conv1D(nn.Module):
    """GPT-2's transposed linear layer: `y = x @ weight + bias`, weight shape [in, out].

    Arguments are ordered like nn.Linear (in, out), unlike transformers' Conv1D(nf, nx).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    @property
    def nf(self) -> int:
        """Output features (transformers' name)."""
        return self.out_features

    @property
    def nx(self) -> int:
        """Input features (transformers' name)."""
        return self.in_features

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.t(), self.bias)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


class HostLinear(OperatorHost, nn.Linear):
    """A frozen linear operator that hosts tasks' PEFT modules (weight keys stay `weight`, `bias`;
    a task's module lives at `adapters.<task>`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.adapters = nn.ModuleDict()

    def base_forward(self, x_TI: Tensor) -> Tensor:
        return F.linear(x_TI, self.weight, self.bias)

    def forward(self, x_TI: Tensor, layout: MicroBatchLayout) -> Tensor:
        """The linear once over all tokens, then each task of `layout` adapts its segment."""
        return self.adapted_forward(x_TI, layout)


class HostConv1D(OperatorHost, Conv1D):
    """GPT-2's Conv1D as a PEFT host (see `HostLinear`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.adapters = nn.ModuleDict()

    def base_forward(self, x_TI: Tensor) -> Tensor:
        return F.linear(x_TI, self.weight.t(), self.bias)

    def forward(self, x_TI: Tensor, layout: MicroBatchLayout) -> Tensor:
        """The transposed linear once over all tokens, then each task of `layout` adapts its segment."""
        return self.adapted_forward(x_TI, layout)


class HostEmbedding(PeftHost, nn.Embedding):
    """The token embedding as a PEFT host of soft prompts (weight key stays `weight`).

    A task with an `InputPrefixModule` here (prompt tuning) lays each of its sequences out with P
    placeholder tokens first; their embeddings are replaced by the task's P soft tokens."""

    accepted_kinds = frozenset({AttachmentKind.INPUT_PREFIX})

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.adapters = nn.ModuleDict()

    def forward(self, input_ids_T: Tensor, layout: MicroBatchLayout) -> Tensor:
        """Embeddings [T, E] of a packed buffer, the first P rows of each sequence of a task with
        soft tokens here replaced by them."""
        x_TE = nn.Embedding.forward(self, input_ids_T)
        prompts: dict[str, Tensor] = {}
        for seg in layout.segments:
            module = self.adapters[seg.task] if seg.task in self.adapters else None
            if isinstance(module, InputPrefixModule):
                prompts[seg.task] = module.soft_tokens().to(x_TE.dtype)
        if not prompts:
            return x_TE
        sizes: list[int] = []
        sources: list[Tensor | None] = []  # None: the piece keeps its token embeddings
        cursor = 0
        bounds = layout.cu_seqlens_S1.tolist()
        for seg in layout.segments:
            prompt = prompts.get(seg.task)
            if prompt is None:
                continue
            for start, end in zip(bounds[:-1], bounds[1:]):
                if start < seg.start or end > seg.end or start == end:
                    continue
                num_virtual = prompt.shape[0]
                if end - start < num_virtual:
                    raise ValueError(
                        f"task {seg.task}: a sequence of {end - start} tokens cannot hold its {num_virtual} soft tokens"
                    )
                sizes += [start - cursor, num_virtual]
                sources += [None, prompt]
                cursor = start + num_virtual
        sizes.append(x_TE.shape[0] - cursor)
        sources.append(None)
        pieces = x_TE.split(sizes)
        return torch.cat([piece if src is None else src for piece, src in zip(pieces, sources)], dim=0)


def _gelu_new(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": F.relu,
}


SILU_NAMES = frozenset({"silu", "swish"})


def gated_activation(gate: Tensor, up: Tensor, name: str) -> Tensor:
    """``act(gate) * up`` for transformers' activation `name` (one fused kernel for SiLU on the
    CPU, `muxtune.kernels.cpu_fused`)."""
    if name in SILU_NAMES:
        return silu_and_mul(gate, up)
    return activation(name)(gate) * up


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function transformers' ACT2FN[name] computes."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        supported = sorted(_ACTIVATIONS)
        raise ValueError(f"activation {name!r} is not supported (supported: {supported})") from None


def rope_inv_freq(
    head_dim: int,
    theta: float,
    scaling: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Rotary inverse frequencies [head_dim // 2] in fp32, as transformers computes them
    (default, linear and llama3 rope types). Computed on the CPU (a meta tensor would take
    torch's slow Python decompositions) and moved to `device` (default: the current default)."""
    target = torch.get_default_device() if device is None else torch.device(device)
    return _rope_inv_freq_cpu(head_dim, theta, scaling).to(target)


def _rope_inv_freq_cpu(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type != "llama3":
        raise ValueError(f"rope_type {rope_type!r} is not supported")
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [T, D] for given position ids; `inv_freq` is a non-persistent fp32 buffer."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = dict(scaling) if scaling else None
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, self.scaling), persistent=False)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute `inv_freq` in fp32 (after meta construction or a dtype cast)."""
        device = self.inv_freq.device if device is None else device
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling, device=device)

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        freqs = position_ids[:, None].float() * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def output_rows(x_TC: Tensor, layout: MicroBatchLayout) -> Tensor:
    """The rows of ``x_TC`` whose final hidden states are read (all of them when the layout
    declares no output rows). A family's last layer keeps only these after attention: past it,
    rows do not interact, and the other rows' results would be thrown away."""
    kept = layout.output_rows
    return x_TC if kept is None else x_TC.index_select(0, host_to_device(kept.rows_N, x_TC.device))


def output_layout(layout: MicroBatchLayout) -> MicroBatchLayout:
    """The layout of the rows `output_rows` keeps."""
    return layout if layout.output_rows is None else layout.output_rows.layout


torch.fx.wrap("output_layout")


def apply_rotary(q_THD: Tensor, k_THD: Tensor, cos_TD: Tensor, sin_TD: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate queries and keys by their positions' angles: ``x * cos + rotate_half(x) * sin``."""
    return rotary(q_THD, cos_TD, sin_TD), rotary(k_THD, cos_TD, sin_TD)


class BackboneForCausalLM(nn.Module, abc.ABC):
    """Common interface of the backbone families.

    Subclasses define `hidden_states(input_ids_T, position_ids_T, layout)`,
    `input_embeddings()` and an `lm_head` host; `base_model_prefix` is the name of the
    body module in Hugging Face checkpoints ("model" or "transformer").
    """

    base_model_prefix: str = "model"
    splittable: bool = False  # whether the family builds tensor-parallel shards (a `split` argument)
    lm_head: HostLinear

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config

    @abc.abstractmethod
    def input_embeddings(self) -> nn.Embedding:
        """The token embedding module."""

    @abc.abstractmethod
    def hidden_states(self, input_ids_T: Tensor, position_ids_T: Tensor, layout: MicroBatchLayout) -> Tensor:
        """Final hidden states [T, hidden] (before lm_head) of a packed buffer; of its output
        rows only ([N, hidden], in buffer order) when the layout declares them."""

    def forward(self, input_ids_T: Tensor, position_ids_T: Tensor, layout: MicroBatchLayout) -> Tensor:
        """Logits [T, vocab] of a packed buffer of sequences ([N, vocab] of the layout's output
        rows when it declares them).

        input_ids_T, position_ids_T: int64, positions restarting for each sequence (at 0, or at P
        after a prefix tuning task's P learned keys/values);
        layout: the buffer's sequence boundaries and task segments.
        """
        return self.lm_head(self.hidden_states(input_ids_T, position_ids_T, layout), output_layout(layout))

    def tied_weight_keys(self) -> tuple[str, ...]:
        """state_dict keys that alias another parameter (absent from checkpoints)."""
        return ("lm_head.weight",) if self.config.tie_word_embeddings else ()

    def tie_weights(self) -> None:
        """Make lm_head share the embedding Parameter when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.input_embeddings().weight

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute derived non-persistent buffers (rotary tables) on `device`."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_buffers(device)
