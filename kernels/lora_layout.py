"""Host-built tables that describe a segmented multi-task LoRA call.

Shape legend (used by every `kernels/lora_*` module):
    T  tokens of the packed micro-batch         D  in-features of the anchor
    O  out-features of the anchor               P  adapter slots (tasks) at the anchor
    R  sum of all slots' ranks (concatenated)   M  largest rank over the slots (width of h)
    S  segments                                 K, N  a kernel's generic reduction / output axis

Weight layout. Each slot p has peft's `lora_A.weight` A_p (r_p x D) and `lora_B.weight`
B_p (O x r_p). A call takes them concatenated along the rank axis without any padding:
`A_RD = cat([A_0, ..., A_{P-1}], dim=0)` and `B_OR = cat([B_0, ..., B_{P-1}], dim=1)`; slot p owns
rank rows/columns `rank_offsets[p]:rank_offsets[p + 1]`.

Intermediate layout. The shrink result h is a packed `(T, M)` buffer: row t of a segment of slot p
holds `x_t @ A_p^T` in columns `[0, r_p)` and zeros after; rows outside every segment are zero.
Kernels only compute a slot's own `r_p` columns (rank blocks past `r_p` do no work), so mixing a
rank-1 and a rank-64 task costs rank-1 work for the first; only the storage of h is `M` wide.

Two objects carry this to the kernels, both built on the host and moved with one copy each:
`LoraSlots` (per anchor, built once when adapters are attached: ranks, scalings, rank offsets)
and `SegmentLayout` (per micro-batch: segments plus the row tiles and reduction chunks the Triton
kernels iterate over). Nothing on the device path reads them back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_BLOCK_M = 64
DEFAULT_CHUNK_M = 1024


@dataclass(frozen=True)
class LoraSlots:
    """Ranks and scalings of the P adapter slots at one anchor (host tuples + device tensors)."""

    ranks: tuple[int, ...]
    scalings: tuple[float, ...]
    rank_offsets_P1: torch.Tensor  # int32, slot p owns rank rows [off[p], off[p + 1])
    scalings_P: torch.Tensor  # float32

    @classmethod
    def build(cls, ranks: Sequence[int], scalings: Sequence[float], device: torch.device | str = "cpu") -> LoraSlots:
        """Validate and move the slot table to `device` (once per anchor, not per call)."""
        ranks = tuple(int(r) for r in ranks)
        scalings = tuple(float(s) for s in scalings)
        if not ranks:
            raise ValueError("LoraSlots needs at least one slot")
        if len(scalings) != len(ranks):
            raise ValueError(f"{len(ranks)} ranks but {len(scalings)} scalings")
        if any(r < 1 for r in ranks):
            raise ValueError(f"ranks must be >= 1, got {ranks}")
        offsets = [0]
        for r in ranks:
            offsets.append(offsets[-1] + r)
        return cls(
            ranks=ranks,
            scalings=scalings,
            rank_offsets_P1=torch.tensor(offsets, dtype=torch.int32).to(device),
            scalings_P=torch.tensor(scalings, dtype=torch.float32).to(device),
        )

    @property
    def num_slots(self) -> int:
        return len(self.ranks)

    @property
    def max_rank(self) -> int:
        return max(self.ranks)

    @property
    def total_rank(self) -> int:
        return sum(self.ranks)

    def rank_offset(self, slot: int) -> int:
        """First row of `slot` on the concatenated rank axis (host value)."""
        return sum(self.ranks[:slot])


@dataclass(frozen=True)
class SegmentLayout:
    """Which rows of a packed micro-batch belong to which adapter slot.

    `segments` are sorted, disjoint `(start, end, slot)` row ranges; empty ones are allowed and
    a slot may own several. Rows outside every segment pass through (no LoRA contribution).
    The device tensors are views of one int32 buffer:

    - `seg_starts_S`, `seg_ends_S`, `seg_slots_S`: the segments.
    - `tile_starts`, `tile_ends`, `tile_slots`: row tiles of at most `block_m` rows that cover
      `[0, num_tokens)` exactly once, never crossing a segment boundary; slot -1 marks rows
      outside every segment. One program of the row-parallel kernels handles one tile.
    - `chunk_starts`, `chunk_ends`, `chunk_slots`: each slot's rows cut into pieces of at most
      `chunk_m` rows, grouped by slot; `slot_chunk_offsets_P1[p]:[p + 1]` are slot p's chunks.
      The weight-gradient kernels reduce each chunk, then sum a slot's chunks in a fixed order
      (deterministic, no atomics), so one huge segment still spreads over many programs.
    """

    num_tokens: int
    num_slots: int
    block_m: int
    chunk_m: int
    segments: tuple[tuple[int, int, int], ...]
    num_tiles: int
    num_chunks: int
    seg_starts_S: torch.Tensor
    seg_ends_S: torch.Tensor
    seg_slots_S: torch.Tensor
    tile_starts: torch.Tensor
    tile_ends: torch.Tensor
    tile_slots: torch.Tensor
    chunk_starts: torch.Tensor
    chunk_ends: torch.Tensor
    chunk_slots: torch.Tensor
    slot_chunk_offsets_P1: torch.Tensor

    @classmethod
    def build(
        cls,
        segments: Sequence[tuple[int, int, int]],
        num_tokens: int,
        num_slots: int,
        device: torch.device | str = "cpu",
        *,
        block_m: int = DEFAULT_BLOCK_M,
        chunk_m: int = DEFAULT_CHUNK_M,
    ) -> SegmentLayout:
        """Validate `(start, end, slot)` segments and build the tables on the host, then copy once."""
        if block_m < 16 or block_m & (block_m - 1):
            raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
        if chunk_m < block_m or chunk_m % block_m:
            raise ValueError(f"chunk_m must be a positive multiple of block_m={block_m}, got {chunk_m}")
        segments = tuple((int(s), int(e), int(p)) for s, e, p in segments)
        cursor = 0
        for start, end, slot in segments:
            if not (cursor <= start <= end <= num_tokens):
                raise ValueError(f"segments must be sorted, disjoint and inside [0, {num_tokens}): {segments}")
            if not 0 <= slot < num_slots:
                raise ValueError(f"segment slot {slot} outside [0, {num_slots})")
            cursor = end

        tiles: list[tuple[int, int, int]] = []
        cursor = 0
        for start, end, slot in segments + ((num_tokens, num_tokens, -1),):
            _cut(cursor, start, -1, block_m, tiles)
            _cut(start, end, slot, block_m, tiles)
            cursor = end
        chunks: list[tuple[int, int, int]] = []
        slot_chunk_offsets = [0]
        for p in range(num_slots):
            for start, end, slot in segments:
                if slot == p:
                    _cut(start, end, p, chunk_m, chunks)
            slot_chunk_offsets.append(len(chunks))

        columns = [
            [s for s, _, _ in segments],
            [e for _, e, _ in segments],
            [p for _, _, p in segments],
            *([t[i] for t in tiles] for i in range(3)),
            *([c[i] for c in chunks] for i in range(3)),
            slot_chunk_offsets,
        ]
        flat = [v for col in columns for v in col]
        host = torch.tensor(flat, dtype=torch.int32)
        device = torch.device(device)
        if device.type == "cuda":
            host = host.pin_memory()
        buffer = host.to(device, non_blocking=True)
        views = buffer.split([len(col) for col in columns])
        return cls(num_tokens, num_slots, block_m, chunk_m, segments, len(tiles), len(chunks), *views)

    @property
    def device(self) -> torch.device:
        return self.tile_starts.device


def current_stream_id(device: torch.device) -> int:
    """The current CUDA stream of ``device`` as a number (0 off CUDA): a cache key for tables
    copied to the device on that stream."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _cut(start: int, end: int, slot: int, size: int, out: list[tuple[int, int, int]]) -> None:
    """Append `[start, end)` cut into pieces of at most `size` rows."""
    for piece in range(start, end, size):
        out.append((piece, min(piece + size, end), slot))
