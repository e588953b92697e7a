"""Move adapters between supports.

`reseed_adapter`: project an adapter onto another seeded support (values kept where the supports
meet, zero elsewhere) and report the retained share of ||Δ||². The same seed and density is the
identity. `compact_adapter`: store as seeded every explicit support that is a seeded one (no value
changes), inferring each tensor's density when none is given.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from .. import ops
from ..adapter import Adapter, TensorDelta
from ..checkpoint import Checkpoint
from ..errors import SpraError
from ..fingerprint import fingerprints
from ..support import BLOCK, ExplicitSupport, SeededSupport, block_counts
from .checks import check_fits


def reseed_adapter(
    adapter: Adapter,
    seed: int,
    density: float | None = None,
    base: Checkpoint | None = None,
    where: str | os.PathLike | None = None,
) -> tuple[Adapter, dict]:
    """Move every tensor to the seeded support (seed, density); returns the adapter and a report.

    `base` provides the fingerprints of the new supports; it is needed unless every tensor keeps
    its support (the same seed and density: the identity). When given, the adapter is verified
    against it first (names, shapes, dtypes, fingerprints), so a wrong base is refused rather than
    fingerprinted into the result; `where` names the adapter in errors."""
    supports = {}
    for name, d in adapter.deltas.items():
        new_density = density if density is not None else _density_of(d, where)
        try:
            supports[name] = SeededSupport(seed, name, d.numel, new_density)
        except ValueError as e:
            raise SpraError(f"tensor {name!r}: {e}", where) from None
    if base is not None:
        check_fits(base, adapter, where)
    elif any(supports[n] != d.support for n, d in adapter.deltas.items()):
        raise SpraError("reseeding to a new support needs the base (--base) for the fingerprints", where)
    deltas, report = {}, {}
    kept_total = energy_total = 0.0
    for name, d in adapter.deltas.items():
        support = supports[name]
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


def compact_adapter(
    adapter: Adapter, seed: int, density: float | None = None, where: str | os.PathLike | None = None
) -> tuple[Adapter, int]:
    """Store as seeded every explicit support that equals the seeded one of (seed, density); returns
    the adapter and how many tensors changed. Values and fingerprints are unchanged.

    Without `density` each tensor's is inferred (`seeded_density`); a support that no density
    reproduces is refused (SpraError naming `where`)."""
    deltas, changed = {}, 0
    for name, d in adapter.deltas.items():
        if isinstance(d.support, ExplicitSupport):
            candidate = _matching_seeded(d, seed, density, where)
            if candidate is not None:
                d = TensorDelta(name, d.shape, d.dtype, candidate, d.values, d.fingerprint)
                changed += 1
        deltas[name] = d
    provenance = {"method": "compact", "seed": seed, "density": density, "parent": adapter.provenance}
    return Adapter(deltas, dict(adapter.dense), adapter.base, adapter.task, provenance, adapter.exact), changed


def seeded_density(d: TensorDelta) -> float | None:
    """A density at which the seeded scheme puts as many elements in every block as `d`'s support
    holds (so that the right seed gives exactly this support), or None if there is none.

    Block b = [s, e) of a seeded support holds floor(dens*e) - floor(dens*s) elements, so dens must
    give floor(dens*e) = (indices below e) at every block end e — floor(dens*numel) = count among
    them: an interval [lo, hi). Of its values the shortest decimal is taken (the density a person
    typed), checked exactly as the scheme computes it."""
    ends = np.minimum(np.arange(1, -(-d.numel // BLOCK) + 1, dtype=np.int64) * BLOCK, d.numel)
    below = np.searchsorted(d.support.indices(), ends)  # [blocks]: indices below each block end
    lo = float(np.max(below / ends, initial=0.0))
    hi = float(np.min((below + 1) / ends, initial=np.inf))
    decimals = [max(math.ceil(lo * 10.0**k), 1) / 10.0**k for k in range(1, 18)]
    for candidate in [*decimals, lo, math.nextafter(lo, 2.0)]:  # lo itself may round below the interval
        if candidate < hi and _counts_match(d.numel, candidate, below):
            return candidate
    return None


def _counts_match(numel: int, density: float, below: np.ndarray) -> bool:
    try:
        return np.array_equal(block_counts(numel, density), below)
    except ValueError:  # not a density at all
        return False


def _matching_seeded(d: TensorDelta, seed: int, density: float | None, where) -> SeededSupport | None:
    if density is None:
        density = seeded_density(d)
        if density is None:
            raise SpraError(
                f"tensor {d.name!r}: no density reproduces its support's count ({d.count} of {d.numel}) in every "
                "block of the seeded scheme, so no seed gives this support: it cannot be stored as seeded",
                where,
            )
    try:
        s = SeededSupport(seed, d.name, d.numel, density)
    except ValueError:
        return None
    if s.count == d.count and np.array_equal(s.indices(), d.support.indices()):
        return s
    return None


def _density_of(d: TensorDelta, where) -> float:
    if isinstance(d.support, SeededSupport):
        return d.support.density
    raise SpraError(f"tensor {d.name!r} has an explicit support: give --density", where)


__all__ = ["compact_adapter", "reseed_adapter", "seeded_density"]
