"""Seeded supports (scheme spra-seeded-v1) and the Elias-Fano code: vectors, properties, cross-checks.

Three implementations meet here: the numpy executable spec (support.py), the torch reference
(ops/reference.py), and a plain-Python transcription of the pseudo-code in docs/FORMAT.md §4
(`spec_*` below). The committed vectors in tests/vectors/seeded_v1.json pin all of them.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spra_tools import support as sup
from spra_tools.ops import reference

VECTORS = json.loads((Path(__file__).parent / "vectors" / "seeded_v1.json").read_text(encoding="utf-8"))
CASES = VECTORS["cases"]
B = sup.BLOCK
M64 = (1 << 64) - 1

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# docs/FORMAT.md §4, transcribed with Python integers (independent of support.py's numpy code).
# ---------------------------------------------------------------------------------------------


def spec_mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def spec_tensor_key(seed: int, name: str) -> int:
    h = 0xCBF29CE484222325
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & M64
    return spec_mix64(spec_mix64(seed ^ 0x5350524131) ^ h)


def spec_width(length: int) -> int:
    """The smallest even w >= 2 with 2**w >= length."""
    w = 2
    while (1 << w) < length:
        w += 2
    return w


def spec_block(key: int, b: int, length: int, m: int) -> list[int]:
    """Sorted offsets (inside block b, of `length` elements) of the block's m chosen elements."""
    w = spec_width(length)
    half, mask = w // 2, (1 << (w // 2)) - 1
    keys = [spec_mix64((key + (b * 4 + r + 1) * 0x9E3779B97F4A7C15) & M64) for r in range(4)]

    def feistel(x: int) -> int:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (spec_mix64(k ^ right) & mask)
        return (left << half) | right

    out = []
    for j in range(m):
        y = feistel(j)
        while y >= length:
            y = feistel(y)
        out.append(y)
    return sorted(out)


def spec_indices(seed: int, name: str, numel: int, density: float) -> list[int]:
    key = spec_tensor_key(seed, name)
    out = []
    for b in range(-(-numel // B)):
        s, e = b * B, min((b + 1) * B, numel)
        m = math.floor(density * e) - math.floor(density * s)
        out += [s + o for o in spec_block(key, b, e - s, m)]
    return out


@pytest.fixture
def one_thread():
    """Run torch single-threaded: on small CI machines its intra-op threads cost more than they give."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def split_by_block(idx: np.ndarray, numel: int) -> list[np.ndarray]:
    edges = np.searchsorted(idx, np.arange(1, -(-numel // B)) * B)
    return np.split(idx, edges)


# ---------------------------------------------------------------------------------------------
# (a) committed vectors
# ---------------------------------------------------------------------------------------------


def test_vectors_cover_the_required_cases():
    assert VECTORS["scheme"] == sup.SCHEME
    assert len(CASES) >= 12
    seeds = {c["seed"] for c in CASES}
    assert {0, 1, 2**63 + 5, 2**64 - 1} <= seeds
    numels = {c["numel"] for c in CASES}
    assert {1, 5, 65536, 65536 * 3 + 17, 4096 * 4096} <= numels
    assert any(not c["name"].isascii() for c in CASES)
    assert min(c["density"] for c in CASES) <= 1e-5 and max(c["density"] for c in CASES) == 1.0


def assert_matches_vector(idx: np.ndarray, case: dict) -> None:
    assert idx.dtype == np.int64 and idx.size == case["count"]
    if "indices" in case:
        assert idx.tolist() == case["indices"]
    else:
        assert idx[:64].tolist() == case["first"]
        assert idx[-64:].tolist() == case["last"]
        assert f"{int(idx.astype(np.uint64).sum(dtype=np.uint64)):016x}" == case["sum_mod_2_64"]
        assert hashlib.sha256(idx.astype("<i8").tobytes()).hexdigest() == case["sha256_i64le"]


def vector_id(case: dict) -> str:
    return f"{case['name']}-{case['numel']}-{case['density']}-{case['seed'] % 1000}"


@pytest.mark.parametrize("case", CASES, ids=vector_id)
def test_vector(case):
    seed, name, numel, density = case["seed"], case["name"], case["numel"], case["density"]
    assert numel == math.prod(case["shape"])
    assert f"{sup.tensor_key(seed, name):016x}" == case["tensor_key"]
    assert f"{spec_tensor_key(seed, name):016x}" == case["tensor_key"]
    assert sup.seeded_count(numel, density) == case["count"]
    assert_matches_vector(sup.seeded_indices(seed, name, numel, density), case)
    if "indices" in case:
        assert spec_indices(seed, name, numel, density) == case["indices"]


@pytest.mark.parametrize("case", CASES, ids=vector_id)
def test_vector_torch_reference(case, one_thread):
    got = reference.seeded_indices(case["seed"], case["name"], case["numel"], case["density"], device="cpu")
    assert got.dtype == torch.int64 and got.device.type == "cpu"
    assert_matches_vector(got.numpy(), case)


# ---------------------------------------------------------------------------------------------
# (b) properties of the numpy spec
# ---------------------------------------------------------------------------------------------

seeds = st.integers(0, M64)
names = st.text(max_size=24)
densities = st.one_of(
    st.sampled_from([1e-5, 1e-3, 0.01, 0.1, 0.5, 0.999999, 1.0]),
    st.floats(min_value=1e-6, max_value=1.0, allow_nan=False),
)
numels = st.one_of(
    st.integers(0, 300_000),
    st.integers(0, 20),
    st.builds(lambda k, r: k * B + r, st.integers(0, 4), st.sampled_from([-1, 0, 1, 2, 3, 17])).filter(
        lambda n: n >= 0
    ),
)


@FAST
@given(seed=seeds, name=names, numel=numels, density=densities, pick=st.integers(0, 10))
def test_seeded_properties(seed, name, numel, density, pick):
    idx = sup.seeded_indices(seed, name, numel, density)
    assert idx.dtype == np.int64 and idx.ndim == 1
    assert idx.size == math.floor(density * numel) == sup.seeded_count(numel, density)
    if idx.size:
        assert idx[0] >= 0 and idx[-1] < numel
        assert np.all(np.diff(idx) > 0)  # sorted and unique
    cum = sup.block_counts(numel, density)
    assert cum.size == -(-numel // B)
    if cum.size:
        assert cum[-1] == idx.size
        lengths = np.diff(np.minimum(np.arange(cum.size + 1) * B, numel))
        counts = np.diff(cum, prepend=0)
        assert np.all(counts >= 0) and np.all(counts <= lengths)
        parts = split_by_block(idx, numel)
        assert [p.size for p in parts] == counts.tolist()
        # One block (the last, or one picked at random) regenerated from the documented pseudo-code.
        key = sup.tensor_key(seed, name)
        for b in {cum.size - 1, pick % cum.size}:
            if counts[b] <= 3000:
                s = b * B
                want = [s + o for o in spec_block(key, b, min(numel, s + B) - s, int(counts[b]))]
                assert parts[b].tolist() == want
    assert np.array_equal(idx, sup.seeded_indices(seed, name, numel, density))  # deterministic
    assert np.array_equal(idx, sup.SeededSupport(seed, name, numel, density).indices())


@FAST
@given(seed=seeds, other=seeds, name=names, numel=st.integers(64, 300_000), density=densities)
def test_seed_and_name_sensitive(seed, other, name, numel, density):
    count = sup.seeded_count(numel, density)
    # With at least 16 chosen and 16 left out, two keys give one support with probability < 1e-12.
    if seed == other or count < 16 or numel - count < 16:
        return
    a = sup.seeded_indices(seed, name, numel, density)
    assert not np.array_equal(a, sup.seeded_indices(other, name, numel, density))
    assert not np.array_equal(a, sup.seeded_indices(seed, name + "x", numel, density))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seed": -1},
        {"seed": 2**64},
        {"seed": True},
        {"seed": 1.0},
        {"density": 0.0},
        {"density": -0.1},
        {"density": 1.5},
        {"density": float("nan")},
        {"density": True},
        {"numel": -1},
        {"numel": 2**48},
        {"numel": 10.0},
    ],
)
def test_invalid_arguments_are_refused(kwargs):
    args = {"seed": 0, "name": "w", "numel": 100, "density": 0.5, **kwargs}
    with pytest.raises(ValueError):
        sup.seeded_indices(**args)


def spec_member(seed: int, name: str, numel: int, density: float, i: int) -> bool:
    """Membership by the inverse permutation (docs/FORMAT.md §4.6), without generating the support."""
    key = spec_tensor_key(seed, name)
    b = i // B
    s, e = b * B, min((b + 1) * B, numel)
    m = math.floor(density * e) - math.floor(density * s)
    w = spec_width(e - s)
    half, mask = w // 2, (1 << (w // 2)) - 1
    keys = [spec_mix64((key + (b * 4 + r + 1) * 0x9E3779B97F4A7C15) & M64) for r in range(4)]

    def inverse(x: int) -> int:
        left, right = x >> half, x & mask
        for k in reversed(keys):
            left, right = right ^ (spec_mix64(k ^ left) & mask), left
        return (left << half) | right

    p = inverse(i - s)
    while p >= e - s:
        p = inverse(p)
    return p < m


@pytest.mark.parametrize("numel,density", [(5, 0.5), (300, 0.25), (1000, 0.3), (2 * B + 3, 0.7)])
def test_membership_by_inverse_permutation(numel, density):
    idx = set(sup.seeded_indices(9, "member", numel, density).tolist())
    probe = range(numel) if numel <= 1000 else [*range(300), *range(B - 50, B + 50), *range(2 * B - 5, numel)]
    assert all(spec_member(9, "member", numel, density, i) == (i in idx) for i in probe)


def test_feistel_width():
    assert [sup.feistel_width(n) for n in (1, 2, 3, 4, 5, 16, 17, 300, 1000, B)] == [2, 2, 2, 2, 4, 4, 6, 10, 10, 16]
    assert all(sup.feistel_width(n) == spec_width(n) for n in range(1, B + 1))


def test_feistel_is_a_permutation():
    key = sup.tensor_key(3, "perm")
    for width in (2, 4, 8, 16):
        x = np.arange(1 << width, dtype=np.uint64)
        keys = np.repeat(sup.round_keys(key, np.array([5])), x.size, axis=0)
        assert np.array_equal(np.sort(sup.feistel(x, keys, width)), x)
    for length in (1, 3, 5, 17, 300, 1000, 65535):
        x = np.arange(length, dtype=np.uint64)
        keys = np.repeat(sup.round_keys(key, np.array([2])), length, axis=0)
        assert np.array_equal(np.sort(sup.permute_in_block(x, keys, length)), x)


# ---------------------------------------------------------------------------------------------
# (c) the torch reference generator is bit-identical to the numpy spec
# ---------------------------------------------------------------------------------------------


@settings(
    max_examples=80,
    deadline=None,
    # one_thread holds for the whole test; it has no per-example state.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(seed=seeds, name=names, numel=numels, density=densities)
def test_torch_reference_matches_spec(one_thread, seed, name, numel, density):
    if math.floor(density * numel) > 100_000:
        density /= 4
    got = reference.seeded_indices(seed, name, numel, density, device="cpu")
    assert np.array_equal(got.numpy(), sup.seeded_indices(seed, name, numel, density))


@pytest.mark.parametrize(
    "numel,density",
    [(0, 0.5), (1, 1.0), (2, 0.5), (3, 1.0), (5, 0.4), (17, 1.0), (B - 1, 0.3), (B, 1.0), (B + 1, 1.0)]
    + [(B + 3, 0.9), (2 * B + 1, 0.999), (3 * B + 17, 0.5), (3 * B + 17, 1e-5), (5 * B + 1000, 0.02)],
)
def test_torch_reference_edge_cases(numel, density, one_thread):
    for seed in (0, 2**64 - 1):
        got = reference.seeded_indices(seed, "edge.weight", numel, density, device="cpu")
        assert np.array_equal(got.numpy(), sup.seeded_indices(seed, "edge.weight", numel, density))


# ---------------------------------------------------------------------------------------------
# (d) Elias-Fano
# ---------------------------------------------------------------------------------------------


@st.composite
def index_sets(draw):
    kind = draw(st.sampled_from(["set", "random", "empty", "all", "single", "ends"]))
    numel = draw(st.integers(1, 10**6))
    if kind == "set":
        flat = sorted(draw(st.sets(st.integers(0, numel - 1), max_size=300)))
    elif kind == "random":
        rng = np.random.default_rng(draw(st.integers(0, 2**32)))
        flat = np.flatnonzero(rng.random(numel) < draw(st.floats(0.0, 1.0)))
    elif kind == "empty":
        numel = draw(st.integers(0, 10**6))
        flat = []
    elif kind == "all":
        numel = draw(st.integers(1, 200_000))
        flat = range(numel)
    elif kind == "single":
        flat = [draw(st.integers(0, numel - 1))]
    else:
        flat = sorted({0, numel - 1})
    return np.asarray(flat, dtype=np.int64), numel


@FAST
@given(case=index_sets())
def test_elias_fano_round_trip(case):
    flat, numel = case
    n = flat.size
    low, high = sup.ef_encode(flat, numel)
    assert low.dtype == np.uint8 and high.dtype == np.uint8
    assert (low.size, high.size) == sup.ef_sizes(numel, n)
    out = sup.ef_decode(low, high, numel, n)
    assert out.dtype == np.int64 and np.array_equal(out, flat)
    if n:
        L = sup.ef_low_bits(numel, n)
        assert L == (0 if 2 * n >= numel else math.floor(math.log2(numel / n)))
        bits = n * L + n + ((numel - 1) >> L) + 1
        assert (low.size, high.size) == ((n * L + 7) // 8, (n + ((numel - 1) >> L) + 1 + 7) // 8)
        assert bits <= n * (2 + math.log2(numel / n)) + 1 + 1e-9  # the documented bound
        # Padding bits are zero, so the encoding is canonical.
        assert np.unpackbits(low, bitorder="little")[n * L :].sum() == 0
        assert np.unpackbits(high, bitorder="little")[n + ((numel - 1) >> L) + 1 :].sum() == 0
    else:
        assert low.size == high.size == 0


@FAST
@given(case=index_sets(), where=st.integers(0, 2**40))
def test_elias_fano_high_bit_flip_is_rejected(case, where):
    flat, numel = case
    low, high = sup.ef_encode(flat, numel)
    if high.size == 0:
        return
    bad = high.copy()
    bit = where % (8 * high.size)
    bad[bit // 8] ^= np.uint8(1 << (bit % 8))
    with pytest.raises(ValueError):
        sup.ef_decode(low, bad, numel, flat.size)


def _bits_to_bytes(bits: list[int]) -> np.ndarray:
    return np.packbits(np.asarray(bits, dtype=np.uint8), bitorder="little")


def test_elias_fano_known_encoding():
    # u = 20, n = 3 -> L = floor(log2(20 / 3)) = 2; high string of 3 + (19 >> 2) + 1 = 8 bits.
    flat = np.array([1, 6, 19], dtype=np.int64)
    low, high = sup.ef_encode(flat, 20)
    # lows 1, 2, 3 -> bits (LSB first) 10 01 11; highs 0, 1, 4 -> bits 0, 1+1, 4+2 set.
    assert low.tolist() == [0b111001]
    assert high.tolist() == [0b01000101]
    assert sup.ef_decode(low, high, 20, 3).tolist() == [1, 6, 19]


def test_elias_fano_rejects_corrupted_codes():
    numel, flat = 1024, np.array([3, 100, 101, 900], dtype=np.int64)
    low, high = sup.ef_encode(flat, numel)
    n = flat.size
    with pytest.raises(ValueError, match="bytes"):
        sup.ef_decode(np.append(low, np.uint8(0)), high, numel, n)
    with pytest.raises(ValueError, match="bytes"):
        sup.ef_decode(low, high[:-1], numel, n)
    with pytest.raises(ValueError, match="bytes"):
        sup.ef_decode(low, high, numel, n + 1)  # a count that disagrees with the code's sizes
    with pytest.raises(ValueError, match="bytes"):
        sup.ef_decode(low, high, numel, 0)
    # Popcount: one index too many / too few in the high string.
    extra = high.copy()
    extra[-1] |= np.uint8(0x80)
    with pytest.raises(ValueError, match="holds"):
        sup.ef_decode(low, extra, numel, n)
    missing = high.copy()
    missing[0] &= np.uint8(0xFE)  # index 3 has high part 0: bit 0
    with pytest.raises(ValueError, match="holds"):
        sup.ef_decode(low, missing, numel, n)
    # Two indices in high bucket 0 with decreasing (then equal) low parts.
    assert sup.ef_low_bits(numel, 2) == 9
    L = sup.ef_low_bits(numel, 2)
    high2 = _bits_to_bytes([1, 1] + [0] * ((numel - 1 >> L) + 1))
    for lows in ([5, 3], [7, 7]):
        low2 = _bits_to_bytes([(v >> i) & 1 for v in lows for i in range(L)])
        with pytest.raises(ValueError, match="strictly increasing"):
            sup.ef_decode(low2, high2, numel, 2)
    # An index past numel: u = 1000, n = 1 -> L = 9, high part 1, low part 511 -> 1023.
    L = sup.ef_low_bits(1000, 1)
    low3 = _bits_to_bytes([1] * L)
    high3 = _bits_to_bytes([0, 1, 0])
    with pytest.raises(ValueError, match="strictly increasing"):
        sup.ef_decode(low3, high3, 1000, 1)


# ---------------------------------------------------------------------------------------------
# (e) index spaces beyond 2**31 (shape-only where the support would be large)
# ---------------------------------------------------------------------------------------------


def test_counts_beyond_int32():
    numel, density = 2**33 + 123, 1e-6
    assert sup.seeded_count(numel, density) == math.floor(density * numel) == 8589
    cum = sup.block_counts(numel, density)
    assert cum.dtype == np.int64 and cum.size == 2**17 + 1
    counts = np.diff(cum, prepend=0)
    assert cum[-1] == 8589 and np.all(counts >= 0) and counts[-1] <= 123
    ends = np.minimum((np.arange(cum.size, dtype=np.int64) + 1) * B, numel)
    assert np.array_equal(cum, np.floor(density * ends.astype(np.float64)).astype(np.int64))
    assert sup.SeededSupport(0, "big", 2**47, 0.5).count == 2**46


@pytest.mark.parametrize("numel,density", [(2**33, 1e-7), (2**33 + 123, 1e-6), (2**32 + 7, 2e-6)])
def test_indices_beyond_int32(numel, density, one_thread):
    idx = sup.seeded_indices(2**64 - 1, "model.embed_tokens.weight", numel, density)
    assert idx.size == math.floor(density * numel)
    assert idx[0] >= 0 and idx[-1] < numel and np.all(np.diff(idx) > 0)
    assert idx[-1] >= 2**31  # the index space really is used beyond int32
    ref = reference.seeded_indices(2**64 - 1, "model.embed_tokens.weight", numel, density, device="cpu")
    assert np.array_equal(ref.numpy(), idx)


# ---------------------------------------------------------------------------------------------
# (f) statistics (bounds many standard deviations wide: these do not flake)
# ---------------------------------------------------------------------------------------------


def test_two_seeds_overlap_like_independent_draws():
    numel, density = 4096 * 4096, 0.01
    a = sup.seeded_indices(11, "model.layers.3.mlp.up_proj.weight", numel, density)
    b = sup.seeded_indices(12, "model.layers.3.mlp.up_proj.weight", numel, density)
    expected = a.size * b.size / numel  # ~1678, standard deviation ~41
    overlap = np.intersect1d(a, b, assume_unique=True).size
    assert 0.7 * expected < overlap < 1.3 * expected


def test_positions_are_spread():
    numel, density = 4096 * 4096, 0.01
    idx = sup.seeded_indices(2**63 + 5, "model.layers.7.self_attn.o_proj.weight", numel, density)
    share = idx.size / 16
    # Sixteenths of the tensor (exact by construction), sixteenths of every block, and the
    # sixteen column groups of the 4096 x 4096 matrix: each gets 0.8x to 1.2x its share (~10486,
    # standard deviation ~100 where random).
    for groups in (idx * 16 // numel, (idx % B) * 16 // B, (idx % 4096) * 16 // 4096):
        hist = np.bincount(groups, minlength=16)
        assert hist.size == 16 and np.all(hist > 0.8 * share) and np.all(hist < 1.2 * share)
    # Parity of the offset and the mean offset within a block show no bias either.
    assert abs((idx % 2).mean() - 0.5) < 0.02
    sparse = sup.seeded_indices(2**63 + 5, "model.layers.7.self_attn.o_proj.weight", numel, 1e-5)
    assert abs((sparse % B).mean() - B / 2) < B / 8  # 167 draws: the bound is ~5.6 sigma
