"""Prompt learning: prefix tuning (learned keys/values per layer, the KV_PREFIX kind) and prompt
tuning (learned soft tokens before each sequence, the INPUT_PREFIX kind), as peft computes them.

A task's trainable parameters live in one module named like peft's `prompt_encoder` (parameter
names as peft's: `embedding.weight`, and `transform.{0,2}.{weight,bias}` with prefix tuning's
projection), so its state is keyed `prompt_encoder.<param>` whatever the backbone family and an
adapter file (one `prompt_embeddings` table, no module paths) reads back without the model.

Prefix tuning: the table [P, num_layers * 2 * token_dim] (token_dim = kv heads x head dim) gives
layer l its keys (columns of block 2l) and values (block 2l + 1), as peft's `get_prompt` views
it; with `prefix_projection` it is an MLP's output, `transform(embedding)`. The encoder is
registered in the first attention host's module only; the other layers' modules reference it.
A task's tokens keep positions P.., as transformers gives them after a cache of P tokens.

Prompt tuning: each sequence is laid out with P placeholder tokens first (not scored; positions
0.., as peft's concatenated inputs get them); the embedding host replaces their embeddings by
the task's soft tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from muxtune.specs import PrefixTuningSpec, PromptTuningSpec

from ..sharding import TensorSplit, host_shard, mark_every_stage, mark_partial
from .base import AttachmentKind, InputPrefixModule, KVPrefixModule, PeftHost, uniform_init_
from .registry import (
    AdapterError,
    AdapterFiles,
    AttachContext,
    ExportContext,
    PeftAttachError,
    PeftMethod,
    positive_int_field,
)

if TYPE_CHECKING:
    from ..data import Example

PROMPT_ENCODER = "prompt_encoder"
"""The anchor name of a prompt learning task's parameters (peft's module name)."""
SAVED_KEY = "prompt_embeddings"
"""The one tensor of peft's prompt learning adapter files."""
PLACEHOLDER_ID = 0
"""Token id of the virtual token slots (their embeddings are replaced; any valid id does)."""


def _hosts(model: nn.Module, kind: AttachmentKind) -> list[PeftHost]:
    """The hosts of `kind` modules, in model order."""
    return [m for m in model.modules() if isinstance(m, PeftHost) and kind in m.accepted_kinds]


def _on_meta(ctx: AttachContext) -> bool:
    """True for a meta backbone (the compiler's checks): modules are then built on the meta
    device too, without values."""
    return next(ctx.model.parameters()).device.type == "meta"


def projected_table(
    embedding: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """peft's prefix projection `Linear(Tanh(Linear(embedding)))`."""
    return F.linear(torch.tanh(F.linear(embedding, w0, b0)), w2, b2)


class PrefixEncoder(nn.Module):
    """A task's prefix table [P, num_layers * 2 * token_dim]: learned directly, or (with an
    `encoder_hidden_size`) as `transform(embedding)`, transform = Linear, Tanh, Linear."""

    def __init__(
        self,
        num_virtual_tokens: int,
        num_layers: int,
        token_dim: int,
        encoder_hidden_size: int | None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.token_dim = token_dim
        self.projection = encoder_hidden_size is not None
        width = num_layers * 2 * token_dim
        factory = {"dtype": dtype, "device": device}
        if encoder_hidden_size is None:
            self.embedding = nn.Embedding(num_virtual_tokens, width, **factory)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **factory)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, encoder_hidden_size, **factory),
                nn.Tanh(),
                nn.Linear(encoder_hidden_size, width, **factory),
            )

    def reset_parameters(self, generator: torch.Generator) -> None:
        """peft's default init (torch's): embedding ~ N(0, 1); each Linear's weight and bias
        ~ U(+-1/sqrt(fan_in)), drawn from `generator` in parameter order."""
        with torch.no_grad():
            weight = self.embedding.weight
            weight.copy_(torch.randn(weight.shape, generator=generator, dtype=torch.float32))
            if self.projection:
                for linear in (self.transform[0], self.transform[2]):
                    bound = 1.0 / math.sqrt(linear.in_features)
                    uniform_init_(linear.weight, bound, generator)
                    uniform_init_(linear.bias, bound, generator)

    def table(self) -> torch.Tensor:
        """The whole prefix table [P, num_layers * 2 * token_dim] (what peft saves)."""
        if not self.projection:
            return self.embedding.weight
        first, last = self.transform[0], self.transform[2]
        return projected_table(self.embedding.weight, first.weight, first.bias, last.weight, last.bias)

    def layer_table(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s keys then values [P, 2 * token_dim]; with the projection only that
        layer's rows of the last Linear are computed."""
        cols = slice(2 * layer * self.token_dim, 2 * (layer + 1) * self.token_dim)
        if not self.projection:
            return self.embedding.weight[:, cols]
        first, last = self.transform[0], self.transform[2]
        return projected_table(self.embedding.weight, first.weight, first.bias, last.weight[cols], last.bias[cols])


class PrefixLayer(KVPrefixModule):
    """One layer's view of a task's `PrefixEncoder`. Only the first layer's view registers the
    encoder as a submodule, so the task's parameters are counted and saved once. At an attention
    host split over tensor-parallel ranks (``split``), the view holds this shard's heads only."""

    def __init__(
        self,
        encoder: PrefixEncoder,
        layer: int,
        num_kv_heads: int,
        head_dim: int,
        owner: bool,
        split: TensorSplit | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.split = split
        if owner:
            self.encoder = encoder
        self._shared = (encoder,)  # a tuple: a reference nn.Module does not register

    def shard_dims(self, style: str) -> dict[str, int | None] | None:
        """No parameters of its own: the encoder is whole on every shard (see `attach_prefix`)."""
        return {} if style == "heads" else None

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self._shared[0].layer_table(self.layer).view(-1, 2, self.num_kv_heads, self.head_dim)
        if self.split is not None:
            kv = self.split.take(kv, 2)
        return kv[:, 0], kv[:, 1]

    def extra_repr(self) -> str:
        return f"layer={self.layer}"


class PromptEmbedding(InputPrefixModule):
    """A task's P soft tokens (peft's `PromptEmbedding`: `embedding.weight` [P, E])."""

    def __init__(
        self, num_virtual_tokens: int, dim: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, dim, dtype=dtype, device=device)

    def soft_tokens(self) -> torch.Tensor:
        return self.embedding.weight


def prefix_geometry(model: nn.Module) -> tuple[list[PeftHost], int, int]:
    """The attention hosts, and their kv heads and head dim (the prefix's per-layer shape)."""
    hosts = _hosts(model, AttachmentKind.KV_PREFIX)
    if not hosts:
        raise PeftAttachError("method", "the model has no attention layer to prefix")
    shapes = {(_whole_kv_heads(host), host.head_dim) for host in hosts}
    if len(shapes) != 1:
        raise PeftAttachError("method", f"the model's layers differ in key/value shape ({sorted(shapes)})")
    num_kv_heads, head_dim = shapes.pop()
    return hosts, num_kv_heads, head_dim


def _whole_kv_heads(host: PeftHost) -> int:
    """An attention host's key/value heads in the unsplit model."""
    shard = host_shard(host)
    return shard.out_features // host.head_dim if shard is not None else host.num_kv_heads


def attach_prefix(spec: PrefixTuningSpec, ctx: AttachContext) -> dict[str, nn.Module]:
    """The task's prefix encoder, and one view of it at every attention host. With attention
    split over tensor-parallel ranks, each view takes its shard's heads and the encoder is whole
    on every shard, its gradient a partial sum; over pipeline stages, likewise every stage holds
    it whole and adds its layers' part of the gradient."""
    hosts, num_kv_heads, head_dim = prefix_geometry(ctx.model)
    token_dim = num_kv_heads * head_dim
    hidden = (spec.encoder_hidden_size or token_dim) if spec.prefix_projection else None
    meta = _on_meta(ctx)
    encoder = PrefixEncoder(
        spec.num_virtual_tokens, len(hosts), token_dim, hidden, dtype=ctx.dtype, device="meta" if meta else ctx.device
    )
    if not meta:
        encoder.reset_parameters(ctx.generator)
    mark_every_stage(encoder)
    splits = {shard.split for shard in map(host_shard, hosts) if shard is not None}
    for split in splits:
        mark_partial(encoder, split)
    for layer, host in enumerate(hosts):
        shard = host_shard(host)
        view = PrefixLayer(
            encoder, layer, num_kv_heads, head_dim, owner=layer == 0, split=shard.split if shard else None
        )
        host.add_adapter(ctx.task, view)
    return {PROMPT_ENCODER: encoder}


def shift_positions(spec: PrefixTuningSpec, example: Example) -> Example:
    """A prefix task's tokens take positions P.. (after its P cached prefix tokens)."""
    return dataclasses.replace(example, first_position=spec.num_virtual_tokens)


def _prompt_learning_fields(ctx: ExportContext, num_virtual_tokens: int, token_dim: int, heads: int) -> dict:
    """peft's `PromptLearningConfig` fields for a causal LM."""
    return {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": ctx.base_model,
        "num_virtual_tokens": num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": ctx.backbone.num_layers,
        "inference_mode": True,
        "modules_to_save": None,
    }


def export_prefix(spec: PrefixTuningSpec, state: Mapping[str, torch.Tensor], ctx: ExportContext) -> AdapterFiles:
    """peft's PrefixTuningConfig fields; `prompt_embeddings` is the prefix table (with the
    projection, the MLP's output, as peft saves it)."""
    token_dim = ctx.backbone.num_kv_heads * ctx.backbone.head_dim
    hidden = spec.encoder_hidden_size or token_dim
    tensors = {k.removeprefix(PROMPT_ENCODER + "."): v.detach().to("cpu") for k, v in state.items()}
    table = tensors["embedding.weight"]
    if spec.prefix_projection:
        with torch.no_grad():
            names = ("transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias")
            table = projected_table(table, *(tensors[name] for name in names))
    config = {
        "peft_type": "PREFIX_TUNING",
        **_prompt_learning_fields(ctx, spec.num_virtual_tokens, token_dim, ctx.backbone.num_kv_heads),
        "encoder_hidden_size": hidden,
        "prefix_projection": spec.prefix_projection,
        "init_weights": None,
    }
    return config, {SAVED_KEY: table.contiguous()}


def _saved_table(raw: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], path: Path, width: int) -> torch.Tensor:
    """The file's `prompt_embeddings` [num_virtual_tokens, width], or an AdapterError."""
    num_virtual_tokens = positive_int_field(raw, "num_virtual_tokens", path)
    submodules = raw.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise AdapterError(f"{path}: num_transformer_submodules must be 1 (a causal LM), got {submodules!r}")
    weights = path.with_name("adapter_model.safetensors")
    if set(tensors) != {SAVED_KEY}:
        raise AdapterError(f"{weights}: expected the one tensor {SAVED_KEY!r}, got {sorted(tensors)[:4]}")
    table = tensors[SAVED_KEY]
    if tuple(table.shape) != (num_virtual_tokens, width):
        raise AdapterError(
            f"{weights}: {SAVED_KEY} has shape {tuple(table.shape)}, but {path.name} gives "
            f"({num_virtual_tokens}, {width})"
        )
    return table


def load_prefix(raw: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> tuple[PrefixTuningSpec, dict]:
    """A peft prefix tuning directory without `prefix_projection` (a projected one holds only
    the MLP's output, from which the MLP cannot be recovered)."""
    if raw.get("prefix_projection"):
        raise AdapterError(
            f"{path}: prefix_projection is true, so the file holds only the projected prefix table, not the "
            "reparameterization MLP it came from; it cannot initialize a task with prefix_projection (nor can "
            "peft resume training it)"
        )
    num_layers = positive_int_field(raw, "num_layers", path)
    token_dim = positive_int_field(raw, "token_dim", path)
    table = _saved_table(raw, tensors, path, num_layers * 2 * token_dim)
    spec = PrefixTuningSpec(num_virtual_tokens=table.shape[0])
    return spec, {f"{PROMPT_ENCODER}.embedding.weight": table}


def _text_init_ids(spec: PromptTuningSpec, ctx: AttachContext, vocab_size: int) -> list[int] | None:
    """peft's TEXT init ids: the text's tokens (with special tokens) repeated and cut to P; None
    without a tokenizer on a meta backbone (the compiler's shape checks)."""
    if ctx.encode is None:
        if _on_meta(ctx):
            return None
        raise PeftAttachError("prompt_tuning_init_text", "TEXT initialization needs the job's tokenizer")
    ids = list(ctx.encode(spec.prompt_tuning_init_text or ""))
    if not ids:
        raise PeftAttachError("prompt_tuning_init_text", "tokenizes to no tokens")
    if max(ids) >= vocab_size:
        raise PeftAttachError("prompt_tuning_init_text", f"tokenizes to id {max(ids)}, beyond the vocabulary")
    count = spec.num_virtual_tokens
    return (ids * math.ceil(count / len(ids)))[:count]


def attach_prompt(spec: PromptTuningSpec, ctx: AttachContext) -> dict[str, nn.Module]:
    """The task's soft tokens at the token embedding host: N(0, 1) (RANDOM), or the embeddings of
    `prompt_tuning_init_text`'s tokens (TEXT)."""
    hosts = _hosts(ctx.model, AttachmentKind.INPUT_PREFIX)
    if len(hosts) != 1:
        raise PeftAttachError("method", f"the model has {len(hosts)} token embedding hosts, expected one")
    host = hosts[0]
    meta = _on_meta(ctx)
    module = PromptEmbedding(
        spec.num_virtual_tokens, host.embedding_dim, dtype=ctx.dtype, device="meta" if meta else ctx.device
    )
    weight = module.embedding.weight
    with torch.no_grad():
        if spec.prompt_tuning_init == "TEXT":
            ids = _text_init_ids(spec, ctx, host.num_embeddings)  # checked on a meta backbone too
            if not meta:
                weight.copy_(host.weight[torch.tensor(ids, device=host.weight.device)].float())
        elif not meta:
            weight.copy_(torch.randn(weight.shape, generator=ctx.generator, dtype=torch.float32))
    host.add_adapter(ctx.task, module)
    return {PROMPT_ENCODER: module}


def prepend_virtual_tokens(spec: PromptTuningSpec, example: Example) -> Example:
    """P placeholder tokens (not scored) before the sequence, which then runs over positions
    0..P+L-1; the scored tokens are those of the sequence as given."""
    count = spec.num_virtual_tokens
    return dataclasses.replace(
        example,
        input_ids=(PLACEHOLDER_ID,) * count + example.input_ids,
        is_target=(False,) * count + example.is_target,
    )


def export_prompt(spec: PromptTuningSpec, state: Mapping[str, torch.Tensor], ctx: ExportContext) -> AdapterFiles:
    """peft's PromptTuningConfig fields; `prompt_embeddings` is the soft token table."""
    table = state[f"{PROMPT_ENCODER}.embedding.weight"].detach().to("cpu")
    text = spec.prompt_tuning_init == "TEXT"
    config = {
        "peft_type": "PROMPT_TUNING",
        **_prompt_learning_fields(ctx, spec.num_virtual_tokens, int(table.shape[1]), ctx.backbone.num_heads),
        "prompt_tuning_init": spec.prompt_tuning_init,
        "prompt_tuning_init_text": spec.prompt_tuning_init_text,
        "tokenizer_name_or_path": ctx.base_model if text else None,  # peft requires one with TEXT
        "tokenizer_kwargs": None,
    }
    return config, {SAVED_KEY: table.contiguous()}


def load_prompt(raw: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> tuple[PromptTuningSpec, dict]:
    """A peft prompt tuning directory. Its init fields only say how it started, which the saved
    soft tokens supersede, so the config read back has the default (RANDOM) init: attaching it
    needs no tokenizer."""
    token_dim = positive_int_field(raw, "token_dim", path)
    table = _saved_table(raw, tensors, path, token_dim)
    return PromptTuningSpec(num_virtual_tokens=table.shape[0]), {f"{PROMPT_ENCODER}.embedding.weight": table}


PREFIX_TUNING = PeftMethod(
    name="prefix_tuning",
    spec_type=PrefixTuningSpec,
    peft_types=("PREFIX_TUNING",),
    attach=attach_prefix,
    export=export_prefix,
    load=load_prefix,
    prepare_example=shift_positions,
)

PROMPT_TUNING = PeftMethod(
    name="prompt_tuning",
    spec_type=PromptTuningSpec,
    peft_types=("PROMPT_TUNING",),
    attach=attach_prompt,
    export=export_prompt,
    load=load_prompt,
    prepare_example=prepend_virtual_tokens,
)
