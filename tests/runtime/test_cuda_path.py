"""The CUDA hot path: a micro-batch's forward and backward never wait for the device.

Skipped without CUDA (CI); run in a GPU session with the rest of the suite.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_fused_training import TASKS
from training_cases import make_batches

from muxtune.runtime.backbone import load_model
from muxtune.runtime.engine import MultiTaskEngine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_forward_backward_has_no_host_sync(tiny_llama_dir: Path, dtype: str) -> None:
    """Segmented LoRA, varlen attention (bf16), the fused loss and its normalizer, all under
    `torch.cuda.set_sync_debug_mode("error")`, which raises on any synchronizing call."""
    loaded = load_model(str(tiny_llama_dir), dtype=dtype, device="cuda")
    engine = MultiTaskEngine(loaded.model)
    batches = {}
    for case in TASKS:
        engine.add_task(case.training)
        batches[case.training.name] = make_batches(case, loaded.config.vocab_size, data_seed=0)
    budgets = {name: 40 for name in batches}
    engine.forward_backward({name: b[0] for name, b in batches.items()}, budgets)  # warm-up: lazy init
    for name in batches:
        engine.optimizer_step(name)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        microbatches = engine.forward_backward({name: b[1] for name, b in batches.items()}, budgets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(microbatches) > 1 and any(len(mb.layout.segments) > 1 for mb in microbatches)
    for name in batches:
        assert engine.optimizer_step(name).loss > 0
