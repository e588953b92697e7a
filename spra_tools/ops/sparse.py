"""Operands of the unmerged sparse product (`ops.sparse_addmm`): supports in the block layout its
kernels read, and segment tables saying which rows of a batch use which sparse matrix.

Block layout. A support of a [rows, cols] matrix is cut into the seeded scheme's blocks of 2**16
flat elements (flat = row * cols + col). For each slot (one matrix among several of that shape),
``block_ptrs[slot, b]`` is the position of block b's first element in the values — int64
[slots, blocks + 1], ``block_ptrs[slot, blocks]`` the end — and each element's offset inside its
block is a uint16 (held as int16), sorted within the block, at the same position as its value. A
seeded support can instead be regenerated in the kernel from its key: then only the values are
resident (2 bytes per bf16 value instead of 4) and every product pays, per element, a Feistel
evaluation and a rank within its block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..support import BLOCK, BLOCK_BITS, SeededSupport, as_int64, block_counts, tensor_key


@dataclass(frozen=True)
class SegmentTable:
    """Rows of a batch and their slots: int32 [S, 3] (first row, end row, slot; a slot < 0 adds
    nothing) on the device, and the longest segment (it sizes the launch)."""

    tensor: torch.Tensor
    max_rows: int


def segment_table(segments, device: torch.device | str) -> SegmentTable:
    """A SegmentTable from (first row, end row, slot) triples: sorted, disjoint row ranges."""
    triples = [(int(a), int(b), int(s)) for a, b, s in segments]
    end = 0
    for a, b, _ in triples:
        if a < end or b < a:
            raise ValueError(f"segments must be sorted, disjoint (first, end, slot) row ranges, got {triples}")
        end = b
    tensor = torch.tensor(triples, dtype=torch.int32).reshape(-1, 3).to(device)
    return SegmentTable(tensor, max((b - a for a, b, _ in triples), default=0))


def num_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def block_offsets(indices: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted flat int64 indices as (in-block offsets, int16 holding uint16; elements per block, int64)."""
    counts = torch.bincount(indices >> BLOCK_BITS, minlength=num_blocks(numel))
    low = indices & (BLOCK - 1)
    return (low - ((low & 0x8000) << 1)).to(torch.int16), counts


def seeded_block_counts(support: SeededSupport, device: torch.device | str) -> torch.Tensor:
    """Elements per block of a seeded support (the scheme's closed form), int64 on `device`."""
    cum = block_counts(support.numel, support.density)
    return torch.from_numpy(np.diff(cum, prepend=np.int64(0))).to(device)


def transpose_indices(indices: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into [rows, cols] as the sorted flat indices of the same elements in the transpose
    [cols, rows], and the order that carries values along (``values_t = values[order]``)."""
    return torch.sort((indices % cols) * rows + indices // cols)


@dataclass(frozen=True)
class SparseLayout:
    """One sparse [rows, cols] matrix in the block layout, values kept apart (they may change, as in
    training). Built transposed, it describes the transpose and the kernel reads ``values[order]``."""

    rows: int
    cols: int
    block_ptrs: torch.Tensor  # [1, blocks + 1] int64
    offsets: torch.Tensor  # int16 [count], or empty: regenerated from `keys`
    keys: torch.Tensor  # int64 [1], or empty
    order: torch.Tensor | None = None

    @classmethod
    def from_indices(cls, indices: torch.Tensor, rows: int, cols: int, transpose: bool = False) -> SparseLayout:
        """From sorted flat int64 indices into [rows, cols] (stored offsets: 2 bytes per element)."""
        order = None
        if transpose:
            indices, order = transpose_indices(indices, rows, cols)
            rows, cols = cols, rows
        offsets, counts = block_offsets(indices, rows * cols)
        ptrs = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).reshape(1, -1)
        return cls(rows, cols, ptrs, offsets, indices.new_empty(0), order)

    @classmethod
    def seeded(cls, support: SeededSupport, rows: int, cols: int, device: torch.device | str) -> SparseLayout:
        """A seeded support regenerated in the kernel at every product: nothing stored but the values."""
        if support.numel != rows * cols:
            raise ValueError(f"support of {support.numel} elements for a [{rows}, {cols}] matrix")
        counts = seeded_block_counts(support, device)
        ptrs = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).reshape(1, -1)
        key = torch.tensor([as_int64(tensor_key(support.seed, support.name))], dtype=torch.int64, device=device)
        return cls(rows, cols, ptrs, torch.empty(0, dtype=torch.int16, device=device), key)
