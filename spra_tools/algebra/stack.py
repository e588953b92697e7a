"""Compose a chain of adapters into one.

`stack`: B was trained on base + A (and C on base + A + B, ...). Applying the stacked adapter to
the base gives, bit for bit in the base dtype, what applying A, then B, ... gives: the chain is
replayed on the base values at the union of the supports with the apply rule (each step rounded to
the base dtype, as sequential application rounds), and the result is stored as exact values against
the base with diff's rule (`exact_values`). Elements whose chain ends where it started are dropped.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ops
from ..adapter import Adapter, explicit_delta
from ..checkpoint import Checkpoint
from ..dtypes import TORCH_DTYPES
from ..errors import MismatchError, SpraError
from .checks import check_fits, refuse_nonfinite
from .diff import exact_values


def stack_adapters(base: Checkpoint, adapters: list[tuple[str, Adapter]], values_dtype: str = "BF16") -> Adapter:
    """One adapter equal to applying `adapters` in order (each checked against the weights it lands on)."""
    if not adapters:
        raise SpraError("nothing to stack")
    for path, a in adapters:  # fingerprints per step below: each may be of the weights before it
        check_fits(base, a, path, fingerprints=False)
        refuse_nonfinite(a, path, "stack")
    names = list(dict.fromkeys(n for _, a in adapters for n in a.deltas))
    deltas, dense = {}, {}
    for name in names:
        w = base.read(name).reshape(-1)
        touching = [(p, a.deltas[name]) for p, a in adapters if name in a.deltas]
        union = torch.from_numpy(np.unique(np.concatenate([d.support.indices() for _, d in touching])))
        start = ops.gather(w, union)
        for path, d in touching:
            idx = d.indices()
            why = d.mismatch(w.view(d.shape), ops.gather(w, idx))
            if why and d.mismatch(base.view(name), ops.gather(base.view(name), idx)):
                raise MismatchError(f"tensor {name!r}: {why}", path)
            ops.scatter_apply(w, idx, d.values)
        end = ops.gather(w, union)
        changed = (start.view(torch.int32 if w.element_size() == 4 else torch.int16)
                   != end.view(torch.int32 if w.element_size() == 4 else torch.int16))  # fmt: skip
        keep = union[changed]
        if keep.numel() == 0:
            continue
        values = exact_values(start[changed], end[changed], TORCH_DTYPES[values_dtype])
        if values is None:
            values = exact_values(start[changed], end[changed], torch.float32)
        if values is None:  # not expressible as sparse values: the whole tensor, exactly
            dense[name] = w.view(base.info(name).shape).clone()
            continue
        deltas[name] = explicit_delta(name, base.info(name).shape, w.dtype, keep.numpy(), values, start[changed])
    for _, a in adapters:
        dense.update(a.dense)
    parents = [{"path": p, "provenance": a.provenance} for p, a in adapters]
    return Adapter(deltas, dense, base.identity(), adapters[-1][1].task, {"method": "stack", "parents": parents}, True)
