"""Compose a chain of adapters into one, and move adapters between supports.

`stack`: B was trained on base + A (and C on base + A + B, ...). Applying the stacked adapter to
the base gives, bit for bit in the base dtype, what applying A, then B, ... gives: the chain is
replayed on the base values at the union of the supports with the apply rule (each step rounded to
the base dtype, as sequential application rounds), and the result is stored as exact values against
the base with diff's rule (`exact_values`). Elements whose chain ends where it started are dropped.

`reseed`: project an adapter onto another seeded support (values kept where the supports meet,
zero elsewhere) and report the retained share of ||Δ||². The same seed and density is the identity.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ops
from ..adapter import Adapter, TensorDelta, explicit_delta
from ..checkpoint import Checkpoint
from ..dtypes import TORCH_DTYPES
from ..errors import MismatchError, SpraError
from ..fingerprint import fingerprints
from ..support import ExplicitSupport, SeededSupport
from .diff import exact_values


def stack_adapters(base: Checkpoint, adapters: list[tuple[str, Adapter]], values_dtype: str = "BF16") -> Adapter:
    """One adapter equal to applying `adapters` in order (each checked against the weights it lands on)."""
    if not adapters:
        raise SpraError("nothing to stack")
    names = list(dict.fromkeys(n for _, a in adapters for n in a.deltas))
    deltas, dense = {}, {}
    for name in names:
        if name not in base:
            raise MismatchError(f"tensor {name!r}: not in the base", adapters[0][0])
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


def reseed_adapter(
    adapter: Adapter, seed: int, density: float | None = None, base: Checkpoint | None = None
) -> tuple[Adapter, dict]:
    """Move every tensor to the seeded support (seed, density); returns the adapter and a report.

    `base` provides the fingerprints of the new supports; it is needed unless every tensor keeps
    its support (the same seed and density: the identity)."""
    deltas, report = {}, {}
    kept_total = energy_total = 0.0
    for name, d in adapter.deltas.items():
        new_density = density if density is not None else _density_of(d)
        try:
            support = SeededSupport(seed, name, d.numel, new_density)
        except ValueError as e:
            raise SpraError(f"tensor {name!r}: {e}") from None
        old = d.support.indices()
        energy = float(d.values.double().square().sum())
        if isinstance(d.support, SeededSupport) and d.support == support:
            deltas[name] = d
            kept = energy
        else:
            new = support.indices()
            pos = np.searchsorted(old, new).clip(max=max(old.size - 1, 0))
            hit = (old[pos] == new) if old.size else np.zeros(new.size, dtype=bool)
            values = torch.zeros(support.count, dtype=d.values.dtype)
            values[torch.from_numpy(hit)] = d.values[torch.from_numpy(pos[hit])]
            kept = float(values.double().square().sum())
            if base is None:
                raise SpraError("reseeding to a new support needs the base (--base) for the fingerprints")
            w = base.view(name)
            deltas[name] = TensorDelta(
                name, d.shape, d.dtype, support, values, fingerprints(ops.gather(w, ops.support_indices(support)))
            )
        report[name] = {"retained": kept / energy if energy else 1.0, "count": support.count}
        kept_total, energy_total = kept_total + kept, energy_total + energy
    provenance = {"method": "reseed", "seed": seed, "density": density, "parent": adapter.provenance}
    out = Adapter(
        deltas,
        dict(adapter.dense),
        adapter.base,
        adapter.task,
        provenance,
        adapter.exact and kept_total == energy_total,
    )
    return out, {"tensors": report, "retained": kept_total / energy_total if energy_total else 1.0}


def compact_adapter(adapter: Adapter, seed: int, density: float | None = None) -> tuple[Adapter, int]:
    """Store as seeded every explicit support that equals the seeded one of (seed, density); returns
    the adapter and how many tensors changed. Values and fingerprints are unchanged."""
    deltas, changed = {}, 0
    for name, d in adapter.deltas.items():
        if isinstance(d.support, ExplicitSupport):
            candidate = _matching_seeded(d, seed, density)
            if candidate is not None:
                d = TensorDelta(name, d.shape, d.dtype, candidate, d.values, d.fingerprint)
                changed += 1
        deltas[name] = d
    return Adapter(deltas, dict(adapter.dense), adapter.base, adapter.task, adapter.provenance, adapter.exact), changed


def _matching_seeded(d: TensorDelta, seed: int, density: float | None) -> SeededSupport | None:
    candidates = [density] if density is not None else [d.count / d.numel] if d.numel else []
    for dens in candidates:
        try:
            s = SeededSupport(seed, d.name, d.numel, dens)
        except ValueError:
            continue
        if s.count == d.count and np.array_equal(s.indices(), d.support.indices()):
            return s
    return None


def _density_of(d: TensorDelta) -> float:
    if isinstance(d.support, SeededSupport):
        return d.support.density
    raise SpraError(f"tensor {d.name!r} has an explicit support: give --density")


def compare_adapters(a: Adapter, b: Adapter) -> dict:
    """Per tensor: support overlap, cosine of the two deltas on the overlap, and both norms."""
    tensors, overlap_total = {}, 0
    for name in sorted(set(a.deltas) | set(b.deltas)):
        da, db = a.deltas.get(name), b.deltas.get(name)
        if da is None or db is None:
            tensors[name] = {"only_in": "a" if db is None else "b"}
            continue
        ia, ib = da.support.indices(), db.support.indices()
        common, pa, pb = np.intersect1d(ia, ib, assume_unique=True, return_indices=True)
        va, vb = da.values.double()[torch.from_numpy(pa)], db.values.double()[torch.from_numpy(pb)]
        denom = float(va.norm() * vb.norm())
        tensors[name] = {
            "count_a": da.count,
            "count_b": db.count,
            "overlap": int(common.size),
            "cosine_on_overlap": float(va @ vb) / denom if denom else None,
            "norm_a": float(da.values.double().norm()),
            "norm_b": float(db.values.double().norm()),
        }
        overlap_total += int(common.size)
    shared = [t for t in tensors.values() if "overlap" in t]
    summary = {
        "tensors_in_both": len(shared),
        "only_in_one": len(tensors) - len(shared),
        "overlap": overlap_total,
        "values_a": a.num_values,
        "values_b": b.num_values,
    }
    return {"summary": summary, "tensors": tensors}
