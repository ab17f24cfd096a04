"""Micro-batch layouts travel with their micro-batch: several micro-batches can be in flight at
once (forward 1, forward 2, backward 1, backward 2) with the same gradients as one after the other.

Legend: T tokens of a packed buffer, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hf_cases import VOCAB, hf_model
from torch.utils.checkpoint import checkpoint

from muxtune.runtime.layout import MicroBatchLayout, Segment
from muxtune.runtime.models import BackboneForCausalLM, load_backbone
from muxtune.runtime.peft import LoraModule, attach_task
from muxtune.specs import LoraSpec

FAMILY_TARGETS = {
    "llama_tied_gqa_bias": ("q_proj", "v_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "opt_post_ln_proj": ("q_proj", "fc1", "project_out"),
}
# (sequence lengths, owning task per sequence): different tasks and sequence boundaries per
# micro-batch; task b is in both, so its gradients accumulate across them.
MICROBATCHES = (
    ((5, 7, 4, 6), ("a", "a", None, "b")),
    ((3, 9, 8), ("c", "b", "b")),
)


def test_for_sequences_merges_a_tasks_adjacent_sequences() -> None:
    layout = MicroBatchLayout.for_sequences([2, 3, 1, 4], ["a", "a", None, "b"])
    assert layout.cu_seqlens_S1.tolist() == [0, 2, 5, 6, 10] and layout.cu_seqlens_S1.dtype == torch.int64
    assert layout.segments == (Segment("a", 0, 5), Segment("b", 6, 10))
    assert (layout.num_tokens, layout.num_sequences, layout.tasks) == (10, 4, ("a", "b"))
    one = MicroBatchLayout.single_task("a", 7)
    assert one.cu_seqlens_S1.tolist() == [0, 7] and one.segments == (Segment("a", 0, 7),)
    assert MicroBatchLayout.for_sequences([3]).segments == ()
    with pytest.raises(AssertionError, match="task a has two segments"):
        MicroBatchLayout.for_sequences([1, 1, 1], ["a", "b", "a"])


@pytest.mark.parametrize(
    ("cu", "segments", "num_tokens", "message"),
    [
        ([0, 2, 4], (Segment("a", 0, 2), Segment("a", 2, 4)), 4, "task a has two segments"),
        ([0, 2, 4], (Segment("b", 2, 4), Segment("a", 0, 2)), 4, "bad segment order"),
        ([0, 2, 4], (Segment("a", 0, 3),), 4, "does not cover whole sequences"),
        ([0, 2, 4], (), 5, "must run from 0 to num_tokens=5"),
        ([0, 3, 2, 4], (), 4, "decreases"),
    ],
)
def test_bad_layouts_are_refused(cu: list[int], segments: tuple[Segment, ...], num_tokens: int, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        MicroBatchLayout(torch.tensor(cu, dtype=torch.int64), segments, num_tokens)


def build(
    case: str, path: Path, dropout_c: float = 0.1
) -> tuple[BackboneForCausalLM, dict[str, LoraModule], torch.Generator]:
    """The case's backbone with tasks a (also on lm_head), b and c (with `dropout_c`); B non-zero."""
    hf_model(case).save_pretrained(path)
    model, _ = load_backbone(path, torch.float32)
    model.requires_grad_(False)
    targets = FAMILY_TARGETS[case]
    configs = {
        "a": LoraSpec("lora", 2, 4.0, 0.0, (targets[0], "lm_head")),
        "b": LoraSpec("lora", 4, 8.0, 0.0, targets[1:]),
        "c": LoraSpec("lora", 3, 3.0, dropout_c, targets),
    }
    dropout = torch.Generator()
    modules: dict[str, LoraModule] = {}
    generator = torch.Generator().manual_seed(11)
    for seed, (task, config) in enumerate(configs.items()):
        attached = attach_task(model, task, config, seed=seed, dropout_generator=dropout)
        for anchor, module in attached.items():
            with torch.no_grad():
                module.lora_B.weight.copy_(0.3 * torch.randn(module.lora_B.weight.shape, generator=generator))
            modules[f"{task}:{anchor}"] = module
    return model, modules, dropout


def microbatch_loss(model: BackboneForCausalLM, index: int) -> torch.Tensor:
    """Summed next-token NLL of micro-batch `index` against fixed random targets."""
    seq_lens, tasks = MICROBATCHES[index]
    layout = MicroBatchLayout.for_sequences(seq_lens, tasks)
    gen = torch.Generator().manual_seed(100 + index)
    input_ids_T = torch.randint(0, VOCAB, (layout.num_tokens,), generator=gen)
    targets_T = torch.randint(0, VOCAB, (layout.num_tokens,), generator=gen)
    position_ids_T = torch.cat([torch.arange(n) for n in seq_lens])
    logits_TV = model(input_ids_T, position_ids_T, layout)
    return F.cross_entropy(logits_TV, targets_T, reduction="sum")


def gradients(
    model: BackboneForCausalLM, modules: dict[str, LoraModule], dropout: torch.Generator, schedule: str
) -> dict[str, torch.Tensor]:
    """Adapter gradients after both micro-batches: `sequential` (forward and backward of one, then
    the other), `in_flight` (both forwards, then both backwards) or `recompute` (in flight, each
    forward recomputed during its backward, after the other micro-batch's forward)."""
    for module in modules.values():
        module.zero_grad(set_to_none=True)
    dropout.manual_seed(7)
    if schedule == "sequential":
        for i in range(len(MICROBATCHES)):
            microbatch_loss(model, i).backward()
    else:
        losses = [
            checkpoint(microbatch_loss, model, i, use_reentrant=False)
            if schedule == "recompute"
            else microbatch_loss(model, i)
            for i in range(len(MICROBATCHES))
        ]
        for loss in losses:
            loss.backward()
    return {f"{key}.{name}": p.grad.clone() for key, module in modules.items() for name, p in module.named_parameters()}


def assert_same_gradients(case: str, path: Path, schedule: str, dropout_c: float) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, modules, dropout = build(case, path, dropout_c)
        sequential = gradients(model, modules, dropout, "sequential")
        other = gradients(model, modules, dropout, schedule)
    finally:
        torch.set_num_threads(previous)
    assert sequential.keys() == other.keys() and any(k.startswith("a:lm_head.") for k in sequential)
    for key, grad in sequential.items():
        assert grad.abs().sum() > 0, f"{key} got no gradient; the comparison would be vacuous"
        assert torch.equal(other[key], grad), f"{key} differs under the {schedule} schedule"


@pytest.mark.parametrize("case", list(FAMILY_TARGETS))
def test_microbatches_in_flight_give_the_same_gradients(case: str, tmp_path: Path) -> None:
    assert_same_gradients(case, tmp_path, "in_flight", dropout_c=0.1)


def test_recomputation_uses_its_own_microbatch_layout(tmp_path: Path) -> None:
    """Micro-batch 1's forward is recomputed after micro-batch 2's: a layout held as shared state
    would by then describe micro-batch 2. (Without dropout: checkpointing replays the global RNG
    only, not the tasks' own dropout generators.)"""
    assert_same_gradients("llama_tied_gqa_bias", tmp_path, "recompute", dropout_c=0.0)
