"""Supports: which flat elements of a base tensor an adapter changes.

A *seeded* support is regenerated from (scheme, seed, tensor name, numel, density); an
*explicit* one is stored. This module holds the seeded scheme v1 in numpy form — the
executable specification that every other implementation (torch, C++, CUDA) must match bit for
bit — and the Elias-Fano code used to store explicit supports.

Scheme ``spra-seeded-v1`` (normative text: docs/FORMAT.md §4):

* the flat index space [0, numel) is cut into blocks of 2**16 elements (the last may be short);
* block b = [s, e) receives exactly ``floor(d*e) - floor(d*s)`` elements, the products taken in
  IEEE binary64; so the whole tensor gets ``floor(d*numel)`` and offsets need no scan;
* inside the block the elements are the first m outputs of a keyed permutation of [0, e - s):
  a 4-round balanced Feistel network over w bits (w the smallest even number >= 2 with
  2**w >= e - s), cycle-walked into range, its round keys drawn from a splitmix64 stream keyed by
  seed and name; the block's chosen offsets are then sorted.

All integer arithmetic is modulo 2**64.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

SCHEME = "spra-seeded-v1"
BLOCK_BITS = 16
BLOCK = 1 << BLOCK_BITS
ROUNDS = 4
MAX_NUMEL = 1 << 48  # far beyond any tensor; keeps every product exact in binary64

# The hash family (docs/FORMAT.md §4.1), shared by the seeded scheme and the fingerprint (§6) and by
# every implementation of them (ops/reference.py in torch, cuda/spra_common.h in C++).
MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's stream increment
MIX1 = 0xBF58476D1CE4E5B9  # splitmix64's finaliser multipliers
MIX2 = 0x94D049BB133111EB
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_SCHEME_TAG = 0x5350524131  # "SPRA1"

# Elements per numpy pass (supports, Elias-Fano codes, fingerprints): bounds temporaries to a few tens of MB.
CHUNK = 1 << 20


def as_int64(x: int) -> int:
    """A uint64 as the int64 with the same bits: how torch int64 tensors and the op schemas carry it."""
    return x - (1 << 64) if x >= 1 << 63 else x


def mix64(z: int) -> int:
    """splitmix64's finaliser on a Python int (the scalar twin of `mix64_array`)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def mix64_array(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (numpy wraps the products modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    return z ^ (z >> np.uint64(31))


def fnv1a64(data: bytes) -> int:
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & MASK64
    return h


def tensor_key(seed: int, name: str) -> int:
    """The 64-bit key of one tensor's support: mixes the seed with the tensor's UTF-8 name."""
    check_seed(seed)  # before the cache: True and 1.0 hash as 1 and would find its entry
    return _tensor_key(seed, name)


@functools.lru_cache(maxsize=1 << 16)  # a pure function, hashed byte by byte in Python: ~5 us a name
def _tensor_key(seed: int, name: str) -> int:
    return mix64(mix64(seed ^ _SCHEME_TAG) ^ fnv1a64(name.encode("utf-8")))


def check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MASK64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")


def check_density(density: float) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")


def check_numel(numel: int) -> None:
    if not isinstance(numel, int) or not 0 <= numel < MAX_NUMEL:
        raise ValueError(f"numel must be an integer in [0, 2**48), got {numel!r}")


def seeded_count(numel: int, density: float) -> int:
    """Exact size of a seeded support: floor(density * numel) in binary64."""
    check_numel(numel)
    check_density(density)
    return math.floor(float(density) * float(numel))


def block_counts(numel: int, density: float) -> np.ndarray:
    """Cumulative element counts at each block's end (int64, one entry per block).

    Block b holds ``cum[b] - cum[b-1]`` elements (cum[-1] taken as 0), so any block's offset into
    the sorted support is known without a scan.
    """
    check_numel(numel)
    check_density(density)
    ends = np.minimum((np.arange(_num_blocks(numel), dtype=np.int64) + 1) * BLOCK, numel)
    cum = np.floor(np.float64(density) * ends.astype(np.float64)).astype(np.int64)
    # Only reachable beyond 2**35 elements at densities above 1 - 2**-7 (docs/FORMAT.md §4.3).
    if np.any(np.diff(cum, prepend=np.int64(0)) > np.diff(ends, prepend=np.int64(0))):
        raise ValueError(f"density {density!r} over {numel} elements gives a block more elements than it holds")
    return cum


def _num_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def feistel_width(length: int) -> int:
    """Bits of the permutation domain for a block of `length` elements (even, at least 2)."""
    w = max(2, (length - 1).bit_length())
    return w + (w & 1)


def round_keys(key: int, blocks: np.ndarray) -> np.ndarray:
    """Round keys [len(blocks), ROUNDS]: splitmix64 outputs at counters b*ROUNDS + r + 1."""
    ctr = blocks.astype(np.uint64)[:, None] * np.uint64(ROUNDS) + np.arange(1, ROUNDS + 1, dtype=np.uint64)
    return mix64_array(np.uint64(key) + ctr * np.uint64(GOLDEN))


def feistel(x: np.ndarray, keys: np.ndarray, width: int) -> np.ndarray:
    """The keyed permutation of [0, 2**width): x, keys uint64 of shape [n] and [n, ROUNDS]."""
    half = np.uint64(width // 2)
    mask = np.uint64((1 << (width // 2)) - 1)
    left, right = x >> half, x & mask
    for r in range(ROUNDS):
        left, right = right, left ^ (mix64_array(keys[:, r] ^ right) & mask)
    return (left << half) | right


def permute_in_block(x: np.ndarray, keys: np.ndarray, length: int) -> np.ndarray:
    """The cycle-walked permutation of [0, length), applied to x (uint64 offsets < length)."""
    width = feistel_width(length)
    y = feistel(x, keys, width)
    while True:
        out = np.flatnonzero(y >= np.uint64(length))
        if out.size == 0:
            return y
        y[out] = feistel(y[out], keys[out], width)


def seeded_indices(seed: int, name: str, numel: int, density: float) -> np.ndarray:
    """The seeded support of one tensor: sorted unique int64 flat indices (the v1 spec)."""
    key = tensor_key(seed, name)
    cum = block_counts(numel, density)
    out = np.empty(int(cum[-1]) if cum.size else 0, dtype=np.int64)
    if out.size == 0:
        return out
    counts = np.diff(cum, prepend=np.int64(0))
    full = numel // BLOCK
    # Full blocks share one width and need no cycle walking: process them in chunks of blocks.
    b0 = 0
    while b0 < full:
        first = int(cum[b0 - 1]) if b0 else 0
        b1 = min(full, int(np.searchsorted(cum, first + CHUNK, side="right")) + 1)
        _fill_blocks(out, key, cum, counts, b0, b1, first)
        b0 = b1
    if numel % BLOCK:  # the short last block
        b = full
        m = int(counts[b])
        if m:
            first = int(cum[b]) - m
            keys = np.repeat(round_keys(key, np.array([b])), m, axis=0)
            y = permute_in_block(np.arange(m, dtype=np.uint64), keys, numel - b * BLOCK)
            out[first:] = np.sort(y.astype(np.int64)) + b * BLOCK
    return out


def _fill_blocks(out, key, cum, counts, b0, b1, first):
    m = counts[b0:b1]
    total = int(m.sum())
    if total == 0:
        return
    blocks = np.arange(b0, b1, dtype=np.int64)
    owner = np.repeat(np.arange(b1 - b0), m)
    j = np.arange(total, dtype=np.int64) - (cum[b0:b1] - m - first)[owner]
    keys = round_keys(key, blocks)[owner]
    y = feistel(j.astype(np.uint64), keys, BLOCK_BITS).astype(np.int64)
    # Blocks are laid out in order and each holds offsets < BLOCK, so one sort of the global
    # indices is the same as sorting inside every block.
    out[first : first + total] = np.sort(y + blocks[owner] * BLOCK)


@dataclass(frozen=True)
class SeededSupport:
    """A support regenerated from (seed, name, numel, density) by scheme v1."""

    seed: int
    name: str
    numel: int
    density: float

    def __post_init__(self):
        check_seed(self.seed)
        check_numel(self.numel)
        check_density(self.density)

    @property
    def count(self) -> int:
        return seeded_count(self.numel, self.density)

    def indices(self) -> np.ndarray:
        return seeded_indices(self.seed, self.name, self.numel, self.density)


@dataclass(frozen=True, eq=False)
class ExplicitSupport:
    """A stored support: sorted unique int64 flat indices in [0, numel)."""

    numel: int
    flat: np.ndarray

    def __post_init__(self):
        check_numel(self.numel)
        flat = np.ascontiguousarray(self.flat, dtype=np.int64)
        if flat.ndim != 1:
            raise ValueError("explicit support must be 1-D")
        if flat.size and (flat[0] < 0 or flat[-1] >= self.numel or np.any(np.diff(flat) <= 0)):
            raise ValueError("explicit support must be strictly increasing and inside [0, numel)")
        object.__setattr__(self, "flat", flat)

    @property
    def count(self) -> int:
        return int(self.flat.size)

    def indices(self) -> np.ndarray:
        return self.flat


Support = SeededSupport | ExplicitSupport


# ---------------------------------------------------------------------------------------------
# Elias-Fano code for explicit supports (docs/FORMAT.md §5).
#
# n sorted unique indices below u are split at L = floor(log2(u / n)) bits (0 when n >= u / 2):
# the low L bits of every index are packed back to back, and each index's high part h_i sets bit
# h_i + i of a second bit string of n + (u - 1 >> L) + 1 bits. Bits are packed least significant
# first. Cost: at most 2 + log2(u / n) bits per index.
# ---------------------------------------------------------------------------------------------


def ef_low_bits(numel: int, count: int) -> int:
    if count == 0 or 2 * count >= numel:
        return 0
    return (numel // count).bit_length() - 1


def ef_sizes(numel: int, count: int) -> tuple[int, int]:
    """Bytes of the (low, high) bit strings for `count` indices below `numel`."""
    if count == 0:
        return 0, 0
    low = ef_low_bits(numel, count)
    high_bits = count + ((numel - 1) >> low) + 1
    return (count * low + 7) // 8, (high_bits + 7) // 8


def ef_encode(flat: np.ndarray, numel: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode sorted unique int64 indices below numel into (low, high) uint8 arrays."""
    n = int(flat.size)
    low_bytes, high_bytes = ef_sizes(numel, n)
    low_bits = ef_low_bits(numel, n)
    high = np.zeros(high_bytes * 8, dtype=np.uint8)
    high[(flat >> low_bits) + np.arange(n, dtype=np.int64)] = 1
    low = np.zeros(low_bytes * 8, dtype=np.uint8)
    if low_bits:
        shifts = np.arange(low_bits, dtype=np.int64)
        for c0 in range(0, n, CHUNK):
            part = flat[c0 : c0 + CHUNK]
            bits = ((part[:, None] >> shifts) & 1).astype(np.uint8)
            low[c0 * low_bits : (c0 + part.size) * low_bits] = bits.reshape(-1)
    return np.packbits(low, bitorder="little"), np.packbits(high, bitorder="little")


def ef_decode(low: np.ndarray, high: np.ndarray, numel: int, count: int) -> np.ndarray:
    """Decode and validate; raises ValueError unless the result is a valid support of `count`."""
    low_bytes, high_bytes = ef_sizes(numel, count)
    if low.size != low_bytes or high.size != high_bytes:
        raise ValueError(f"support code has {low.size}+{high.size} bytes, expected {low_bytes}+{high_bytes}")
    if count == 0:
        return np.empty(0, dtype=np.int64)
    ones = np.flatnonzero(np.unpackbits(high, bitorder="little"))
    if ones.size != count:
        raise ValueError(f"support code holds {ones.size} indices, expected {count}")
    flat = (ones - np.arange(count, dtype=np.int64)).astype(np.int64)
    low_bits = ef_low_bits(numel, count)
    if low_bits:
        flat <<= low_bits
        weights = np.int64(1) << np.arange(low_bits, dtype=np.int64)
        bits = np.unpackbits(low, bitorder="little")
        for c0 in range(0, count, CHUNK):
            c1 = min(count, c0 + CHUNK)
            part = bits[c0 * low_bits : c1 * low_bits].reshape(c1 - c0, low_bits)
            flat[c0:c1] |= part.astype(np.int64) @ weights
    if flat[-1] >= numel or np.any(np.diff(flat) <= 0):
        raise ValueError("support code decodes to indices that are not strictly increasing below numel")
    return flat
