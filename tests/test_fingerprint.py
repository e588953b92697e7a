"""Fingerprints (docs/FORMAT.md §6): the device-side computation against the numpy definition, and
the matching rule (compare in the recorded precision). The formula itself is pinned by hand in
test_format_golden.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spra_tools.dtypes import DTYPE_NAMES, raw_bits
from spra_tools.fingerprint import fingerprint, fingerprint_many, fingerprint_many_torch, fingerprints, mismatches

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_torch_fingerprints_match_the_numpy_definition(dtype):
    values = torch.randn(70_001, generator=torch.Generator().manual_seed(3)).to(dtype)
    counts = [0, 5, 65_536, 4_460]
    got = fingerprint_many_torch(values, counts)
    offsets = np.cumsum([0, *counts])
    assert got == [fingerprint(raw_bits(values[a:b])) for a, b in zip(offsets[:-1], offsets[1:])]
    assert fingerprint_many(values, counts) == got


def _values(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_an_fp32_base_is_recognised_in_every_precision():
    base = _values(1000, 1)
    recorded = fingerprints(base)
    assert list(recorded) == ["F32", "BF16", "F16"]
    for dtype in DTYPES:
        assert recorded[DTYPE_NAMES[dtype]] == fingerprint(raw_bits(base.to(dtype)))
        assert mismatches(base.to(dtype), [1000], [recorded]) == [False]
    changed = base.clone()
    changed[500] = torch.nextafter(changed[500], torch.tensor(float("inf")))  # one bit of one value
    assert mismatches(changed, [1000], [recorded]) == [True]


def test_a_lower_precision_base_is_compared_in_its_recorded_dtype():
    base = _values(1000, 2).to(torch.bfloat16)
    recorded = fingerprints(base)
    assert list(recorded) == ["BF16"]
    held_in_fp32 = base.float()  # exact: every bf16 value is an fp32 value
    assert mismatches(held_in_fp32, [1000], [recorded]) == [False]
    nudged = held_in_fp32.clone()
    nudged[7] += 2.0**-20 * nudged[7].abs()  # lost again when cast back to bf16: the same base
    assert mismatches(nudged, [1000], [recorded]) == [False]
    nudged[7] = -nudged[7]
    assert mismatches(nudged, [1000], [recorded]) == [True]


def test_each_entry_of_one_call_compares_in_its_own_recorded_dtype():
    a, b, c = _values(300, 3).to(torch.bfloat16), _values(200, 4), _values(0, 5)
    recorded = [fingerprints(a), fingerprints(b), fingerprints(c)]
    weights = torch.cat([a.float(), b, c])  # one fp32 model: a's base was bf16, b's and c's fp32
    assert mismatches(weights, [300, 200, 0], recorded) == [False, False, False]
    weights[300] = -weights[300]
    assert mismatches(weights, [300, 200, 0], recorded) == [False, True, False]
    weights[0] = -weights[0]
    assert mismatches(weights, [300, 200, 0], recorded) == [True, True, False]
