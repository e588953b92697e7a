"""Fingerprints (docs/FORMAT.md §6): how an adapter recognises the base values it was made on.

The fingerprint of base values at a support hashes their raw bits in support order,
``sum_k mix64(bits_k + (k + 1) * GOLDEN) mod 2**64``, written as 16 lowercase hex digits: order
sensitive, and a sum, so that any device computes it in parallel. `fingerprint` is the definition
(numpy); `fingerprint_many` computes it where the values live, for many segments in one pass
(numpy on the CPU, torch int64 arithmetic on other devices: `fingerprint_many_torch`).

An entry records the fingerprint under its base dtype, and an fp32 base also those of its bf16 and
fp16 casts (`fingerprints`), so that the adapter still recognises its base in a model loaded in
lower precision. `mismatches` is the matching rule. `fingerprint` needs no torch (a file apply
does without it); the rest imports it when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import support as sup

if TYPE_CHECKING:
    import torch

# What a mismatch of the recorded and the found fingerprints means, wherever it is found.
MISMATCH = "values at the support differ from the adapter's base (fingerprint mismatch: wrong base?)"


def fingerprint(bits: np.ndarray) -> str:
    """The fingerprint of raw bits in support order (1-D unsigned: uint16 for BF16 / F16, uint32 for F32)."""
    acc = 0
    for c0 in range(0, bits.size, sup.CHUNK):
        part = bits[c0 : c0 + sup.CHUNK].astype(np.uint64)
        k = np.arange(c0 + 1, c0 + 1 + part.size, dtype=np.uint64)
        acc += int(sup.mix64_array(part + k * np.uint64(sup.GOLDEN)).sum(dtype=np.uint64))
    return f"{acc & sup.MASK64:016x}"


def fingerprint_many(values: torch.Tensor, counts: list[int]) -> list[str]:
    """The fingerprint of each consecutive segment of 1-D float `values` (lengths `counts`), computed
    where the values live."""
    from .dtypes import raw_bits

    if values.device.type != "cpu":
        return fingerprint_many_torch(values, counts)
    bits, out, offset = raw_bits(values), [], 0
    for c in counts:
        out.append(fingerprint(bits[offset : offset + c]))
        offset += c
    return out


def fingerprint_many_torch(values: torch.Tensor, counts: list[int]) -> list[str]:
    """`fingerprint_many` in torch int64 arithmetic (it wraps like uint64), on any device."""
    import torch

    from .dtypes import bit_view
    from .ops import reference

    device, n = values.device, len(counts)
    width = values.element_size() * 8
    bits = bit_view(values.contiguous()).to(torch.int64) & ((1 << width) - 1)  # zero-extended
    sizes = torch.tensor(counts, dtype=torch.int64, device=device)
    owner = torch.repeat_interleave(torch.arange(n, device=device), sizes, output_size=values.numel())
    k = torch.arange(1, values.numel() + 1, device=device) - (torch.cumsum(sizes, 0) - sizes)[owner]
    hashed = reference.mix64(bits + k * sup.as_int64(sup.GOLDEN))
    sums = torch.zeros(n, dtype=torch.int64, device=device).index_add_(0, owner, hashed)
    return [f"{s & sup.MASK64:016x}" for s in sums.tolist()]  # int64 sums wrap: exact mod 2**64


def fingerprints(base_values: torch.Tensor) -> dict[str, str]:
    """What an entry records of its base values (1-D, in support order): their fingerprint under their
    dtype name, and for fp32 also those of their bf16 and fp16 casts."""
    import torch

    from .dtypes import dtype_name, raw_bits

    casts = [base_values]
    if base_values.dtype == torch.float32:
        casts += [base_values.to(torch.bfloat16), base_values.to(torch.float16)]
    return {dtype_name(c.dtype): fingerprint(raw_bits(c)) for c in casts}


def mismatches(values: torch.Tensor, counts: list[int], recorded: list[dict[str, str]]) -> list[bool]:
    """For each consecutive segment of `values` (a weight's values at an entry's support, in the
    weight's dtype), whether it differs from the entry's `recorded` fingerprints.

    A segment is compared in its own dtype where that was recorded; otherwise (a model held in
    another precision than the recorded base) cast, round to nearest even, to the entry's first
    recorded dtype. Normally every entry of a call compares in one dtype: one pass.
    """
    from .dtypes import TORCH_DTYPES, dtype_name

    own = dtype_name(values.dtype)
    keys = [own if own in fp else next(iter(fp)) for fp in recorded]
    differ = [False] * len(recorded)
    for key in dict.fromkeys(keys):
        cast = values if key == own else values.to(TORCH_DTYPES[key])
        for i, got in enumerate(fingerprint_many(cast, counts)):
            if keys[i] == key:
                differ[i] = got != recorded[i][key]
    return differ
