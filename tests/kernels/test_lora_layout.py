"""Layout tables, slot tables, argument checks and backend dispatch (no Triton launches)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from lora_cases import Case, cases, make_inputs, naive

from muxtune.kernels import BACKEND_ENV, LoraSlots, SegmentLayout, chosen_backend, lora_dispatch, segmented_lora


@given(case=cases(max_tokens=300))
@settings(max_examples=60, deadline=None, database=None)
def test_tiles_and_chunks_cover_rows(case: Case) -> None:
    layout = SegmentLayout.build(case.segments, case.num_tokens, len(case.ranks), block_m=16, chunk_m=32)
    owner = [-1] * case.num_tokens
    for start, end, slot in case.segments:
        owner[start:end] = [slot] * (end - start)
    tiles = list(zip(layout.tile_starts.tolist(), layout.tile_ends.tolist(), layout.tile_slots.tolist()))
    assert len(tiles) == layout.num_tiles
    assert [row for s, e, _ in tiles for row in range(s, e)] == list(range(case.num_tokens))
    for start, end, slot in tiles:
        assert 0 < end - start <= 16 and owner[start:end] == [slot] * (end - start)
    offsets = layout.slot_chunk_offsets_P1.tolist()
    chunks = list(zip(layout.chunk_starts.tolist(), layout.chunk_ends.tolist(), layout.chunk_slots.tolist()))
    for slot in range(len(case.ranks)):
        mine = chunks[offsets[slot] : offsets[slot + 1]]
        assert all(p == slot and 0 < e - s <= 32 for s, e, p in mine)
        assert sorted(row for s, e, _ in mine for row in range(s, e)) == [t for t, p in enumerate(owner) if p == slot]
    assert offsets[-1] == layout.num_chunks == len(chunks)
    assert layout.segments == case.segments and layout.seg_slots_S.tolist() == [p for _, _, p in case.segments]


@pytest.mark.parametrize(
    "segments",
    [[(0, 5, 0), (4, 8, 1)], [(5, 8, 0), (0, 2, 1)], [(0, 11, 0)], [(3, 2, 0)], [(0, 2, 2)], [(0, 2, -1)]],
)
def test_bad_segments_rejected(segments: list[tuple[int, int, int]]) -> None:
    with pytest.raises(ValueError):
        SegmentLayout.build(segments, 10, 2)


@pytest.mark.parametrize("block_m, chunk_m", [(8, 64), (48, 96), (16, 24), (64, 32)])
def test_bad_block_sizes_rejected(block_m: int, chunk_m: int) -> None:
    with pytest.raises(ValueError):
        SegmentLayout.build([], 10, 1, block_m=block_m, chunk_m=chunk_m)


def test_slots_table() -> None:
    slots = LoraSlots.build([4, 1, 16], [0.5, 2.0, 1.0])
    assert slots.rank_offsets_P1.tolist() == [0, 4, 5, 21] and slots.rank_offsets_P1.dtype == torch.int32
    assert (slots.max_rank, slots.total_rank, slots.rank_offset(2)) == (16, 21, 5)
    for ranks, scalings in [([], []), ([4, 0], [1.0, 1.0]), ([4], [1.0, 2.0])]:
        with pytest.raises(ValueError):
            LoraSlots.build(ranks, scalings)


def test_auto_backend_picks_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(lora_dispatch, "BACKEND", None)

    def no_triton() -> None:
        raise AssertionError("Triton must not be used for CPU tensors")

    monkeypatch.setattr(lora_dispatch, "_triton_ops", no_triton)
    case = Case(((0, 6, 0), (9, 20, 1)), 24, (2, 5), (1.0, 2.0), 8, 6, device=torch.device("cpu"))
    inputs = make_inputs(case, torch.float32, fused=True, seed=1)
    assert chosen_backend(inputs.x_TD) == "torch"
    y = segmented_lora(inputs.x_TD, inputs.lora_A, inputs.lora_B, case.layout(), case.slots(), inputs.base_TO)
    torch.testing.assert_close(y, naive(inputs)["y"])


def test_backend_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(1)
    monkeypatch.setattr(lora_dispatch, "BACKEND", None)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert chosen_backend(x) == "triton"
    monkeypatch.setattr(lora_dispatch, "BACKEND", "torch")
    assert chosen_backend(x) == "torch"
    monkeypatch.setattr(lora_dispatch, "BACKEND", None)
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        chosen_backend(x)


def test_mismatched_arguments_rejected() -> None:
    case = Case(((0, 6, 0),), 8, (2, 3), (1.0, 1.0), 8, 6)
    inputs = make_inputs(case, torch.float32, fused=True, seed=0)
    layout, slots = case.layout(), case.slots()
    x, a, b, base = inputs.x_TD, inputs.lora_A, inputs.lora_B, inputs.base_TO
    bad_calls = [
        (x[:7], a, b, layout, slots, base),
        (x, a[:1], b[:1], layout, slots, base),
        (x, (a[1], a[0]), b, layout, slots, base),
        (x, (a[0], a[1].double()), b, layout, slots, base),
        (x, a, b, layout, slots, base[:, :5]),
        (x, a, b, SegmentLayout.build([], 8, 3), LoraSlots.build([2, 3, 1], [1.0] * 3), base),
    ]
    for args in bad_calls:
        with pytest.raises(ValueError):
            segmented_lora(*args)
