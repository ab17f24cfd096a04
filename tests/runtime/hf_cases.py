"""Tiny random transformers models of every supported family, used as numerical references."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers

from muxtune.runtime.layout import MicroBatchLayout

transformers.logging.set_verbosity_error()

SEQ_LENS = (5, 11, 3)
VOCAB = 96


def _llama(**kw: object) -> transformers.PreTrainedModel:
    args: dict[str, object] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    cfg = transformers.LlamaConfig(**{**args, **kw})
    return transformers.LlamaForCausalLM(cfg)


def _qwen2() -> transformers.PreTrainedModel:
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rope_theta=1000.0,
    )
    return transformers.Qwen2ForCausalLM(cfg)


def _mistral() -> transformers.PreTrainedModel:
    cfg = transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=64,
        sliding_window=4,
    )
    return transformers.MistralForCausalLM(cfg)


def _gpt2(**kw: object) -> transformers.PreTrainedModel:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, **kw
    )
    return transformers.GPT2LMHeadModel(cfg)


def _opt(**kw: object) -> transformers.PreTrainedModel:
    cfg = transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
        **kw,
    )
    return transformers.OPTForCausalLM(cfg)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

CASES: dict[str, Callable[[], transformers.PreTrainedModel]] = {
    "llama": lambda: _llama(),
    "llama_tied_gqa_bias": lambda: _llama(
        num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True, mlp_bias=True
    ),
    "llama3_rope": lambda: _llama(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "qwen2_untied_gqa": _qwen2,
    "mistral_sliding": _mistral,
    "gpt2": _gpt2,
    "gpt2_layer_scaled_relu": lambda: _gpt2(scale_attn_by_inverse_layer_idx=True, activation_function="relu"),
    "opt_pre_ln": lambda: _opt(do_layer_norm_before=True),
    "opt_post_ln_proj": lambda: _opt(do_layer_norm_before=False, word_embed_proj_dim=16),
}


def randomize(model: torch.nn.Module) -> None:
    """Perturb every parameter so norms, biases and positions are non-trivial."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ("norm" in name or ".ln_" in name) and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif "norm" in name or ".ln_" in name:
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))


def hf_model(case: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    model = CASES[case]()
    randomize(model)
    return model.eval()


def packed_inputs(tasks: tuple[str | None, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor, MicroBatchLayout]:
    """Token ids, position ids and layout of SEQ_LENS packed; sequence i belongs to `tasks[i]`."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (sum(SEQ_LENS),), generator=gen)
    position_ids = torch.cat([torch.arange(n) for n in SEQ_LENS])
    return input_ids, position_ids, MicroBatchLayout.for_sequences(SEQ_LENS, tasks)


@torch.no_grad()
def reference_logits(hf: transformers.PreTrainedModel, ids: torch.Tensor, layout: MicroBatchLayout) -> torch.Tensor:
    """transformers' logits for each packed sequence run alone, concatenated."""
    bounds = layout.cu_seqlens_S1.tolist()
    return torch.cat([hf(ids[None, a:b]).logits[0] for a, b in zip(bounds[:-1], bounds[1:])])


def assert_peft_export_matches(
    model: torch.nn.Module, task: str, hf: transformers.PreTrainedModel, adapter_dir: object
) -> None:
    """Our `model` with `task`'s adapter and `peft.PeftModel.from_pretrained(hf, adapter_dir)` give
    the same logits on packed sequences of `task` (and the adapter does change them)."""
    from peft import PeftModel

    input_ids, position_ids, layout = packed_inputs((task, task, task))
    with torch.no_grad():
        ours = model(input_ids, position_ids, layout)
        base_logits = reference_logits(hf, input_ids, layout)
        peft_model = PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
        theirs = reference_logits(peft_model, input_ids, layout)
    assert (theirs - base_logits).abs().max() > 1e-2, "the adapter must change the logits"
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
