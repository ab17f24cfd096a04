"""Output rows: a layout may declare which rows' final hidden states are read, and the last layer
then works past attention on those rows alone; what those rows get (logits and the adapters'
gradients) is what the whole buffer gives them.

Legend: T tokens of a packed buffer, N output rows, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_layouts import FAMILY_TARGETS, build

from muxtune.runtime.data import Example
from muxtune.runtime.layout import MicroBatchLayout, Segment
from muxtune.runtime.packing import IGNORE_INDEX, build_microbatch

SEQ_LENS = (5, 7, 4, 6, 3)
TASKS = ("a", "a", None, "b", "c")
# Task a keeps rows of its second sequence only, the unowned sequence one row, b two, c none.
ROWS = (7, 8, 11, 14, 16, 18)


def test_output_rows_form_their_own_layout() -> None:
    layout = MicroBatchLayout.for_sequences(SEQ_LENS, TASKS).with_output_rows(ROWS)
    assert layout.output_rows is not None and layout.output_rows.rows_N.tolist() == list(ROWS)
    kept = layout.output_rows.layout
    assert kept.cu_seqlens_S1.tolist() == [0, 0, 3, 4, 6, 6]
    assert kept.segments == (Segment("a", 0, 3), Segment("b", 4, 6))
    assert kept.num_tokens == len(ROWS) and kept.output_rows is None
    assert (layout.cu_seqlens_S1.tolist(), layout.segments) == (
        [0, 5, 12, 16, 22, 25],
        (
            Segment("a", 0, 12),
            Segment("b", 16, 22),
            Segment("c", 22, 25),
        ),
    )
    with pytest.raises(AssertionError, match="must increase"):
        layout.with_output_rows([3, 3])
    with pytest.raises(AssertionError, match="outside"):
        layout.with_output_rows([25])


def test_packing_declares_the_scored_rows() -> None:
    examples = [
        ("a", Example(index=0, input_ids=(1, 2, 3, 4), is_target=(False, False, True, True))),
        ("b", Example(index=1, input_ids=(5, 6, 7), is_target=(False, True, False))),
    ]
    mb = build_microbatch(examples)
    scored = (mb.targets_T != IGNORE_INDEX).nonzero().flatten().tolist()
    assert scored == [1, 2, 4]
    assert mb.layout.output_rows is not None and mb.layout.output_rows.rows_N.tolist() == scored
    assert mb.layout.output_rows.layout.segments == (Segment("a", 0, 2), Segment("b", 2, 3))


def _logits_and_grads(
    case: str, path: Path, rows: tuple[int, ...] | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of ``ROWS`` and the adapters' gradients of their summed NLL, the model run on the
    whole buffer (``rows`` None) or told that only ``rows`` are read."""
    torch.manual_seed(0)
    model, modules, dropout = build(case, path, dropout_c=0.0)
    layout = MicroBatchLayout.for_sequences(SEQ_LENS, TASKS)
    generator = torch.Generator().manual_seed(5)
    input_ids_T = torch.randint(0, 64, (layout.num_tokens,), generator=generator)
    targets_N = torch.randint(0, 64, (len(ROWS),), generator=generator)
    position_ids_T = torch.cat([torch.arange(n) for n in SEQ_LENS])
    if rows is None:
        logits_NV = model(input_ids_T, position_ids_T, layout)[list(ROWS)]
    else:
        logits_NV = model(input_ids_T, position_ids_T, layout.with_output_rows(rows))
    F.cross_entropy(logits_NV, targets_N, reduction="sum").backward()
    grads = {
        f"{key}.{name}": torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for key, module in modules.items()
        for name, p in module.named_parameters()
    }
    return logits_NV.detach(), grads


@pytest.mark.parametrize("case", list(FAMILY_TARGETS))
def test_the_last_layer_on_output_rows_gives_what_the_whole_buffer_gives(case: str, tmp_path: Path) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole, whole_grads = _logits_and_grads(case, tmp_path / "whole", None)
        kept, kept_grads = _logits_and_grads(case, tmp_path / "kept", ROWS)
    finally:
        torch.set_num_threads(previous)
    assert kept.shape == (len(ROWS), whole.shape[1])
    torch.testing.assert_close(kept, whole, rtol=1e-5, atol=1e-5)
    assert whole_grads.keys() == kept_grads.keys()
    assert all(whole_grads[key].abs().sum() > 0 for key in whole_grads if key.startswith(("a:", "b:")))
    for key, grad in whole_grads.items():
        # Rounding-level: products over fewer rows sum in another order.
        scale = float(grad.abs().max())
        torch.testing.assert_close(kept_grads[key], grad, rtol=1e-4, atol=1e-5 * scale, msg=key)


@pytest.mark.parametrize("case", list(FAMILY_TARGETS))
def test_a_tasks_output_rows_do_not_depend_on_other_tasks_rows(case: str, tmp_path: Path) -> None:
    """Task a keeps 2 rows; beside task b's 30 they give bitwise what they give alone (BLAS
    sums a handful of rows in another order than many: the last layer's frozen products run
    per task segment)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _, _ = build(case, tmp_path, dropout_c=0.0)
        generator = torch.Generator().manual_seed(3)
        ids_a = torch.randint(0, 64, (9,), generator=generator)
        ids_b = torch.randint(0, 64, (40,), generator=generator)
        with torch.no_grad():
            alone = model(ids_a, torch.arange(9), MicroBatchLayout.for_sequences([9], ["a"]).with_output_rows([6, 8]))
            both_layout = MicroBatchLayout.for_sequences([9, 40], ["a", "b"]).with_output_rows([6, 8, *range(19, 49)])
            both = model(torch.cat([ids_a, ids_b]), torch.cat([torch.arange(9), torch.arange(40)]), both_layout)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(both[:2], alone)
