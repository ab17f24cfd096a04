"""`truncate_model`: the first N layers of a model, as transformers reads them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import transformers

from muxtune.runtime.model_sources import resolve_model_dir
from muxtune.tools.truncate_model import truncate_model


def test_truncated_model_is_the_first_layers(tmp_path: Path) -> None:
    out = truncate_model("builtin:tiny-llama", 1, tmp_path / "one-layer")
    full = transformers.AutoModelForCausalLM.from_pretrained(str(resolve_model_dir("builtin:tiny-llama")))
    short = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert short.config.num_hidden_layers == 1 < full.config.num_hidden_layers
    kept = dict(short.named_parameters())
    for name, param in full.named_parameters():
        if ".layers." in name and not name.startswith("model.layers.0."):
            assert name not in kept
        else:
            torch.testing.assert_close(kept[name], param, rtol=0, atol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer("a b c")["input_ids"]


def test_bad_layer_count_is_a_clear_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "muxtune.tools.truncate_model", "builtin:tiny-llama", "--layers", "9", "-o", tmp_path],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--layers: must be between 1 and the model's 2 layers, got 9" in done.stderr
    assert not any(tmp_path.iterdir()), "nothing written"
