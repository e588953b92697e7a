"""Merge adapters of one base into one adapter, with mergekit's task-arithmetic family of methods.

Every adapter is a sparse task vector: zero outside its support. Per tensor the output support is
the union of the inputs' supports, and the values are combined in fp32 by flat index through the
one pipeline that methods.py describes (sparsify, weight, elect signs, sum, normalize); each
method is a record there.

Values that every input holding them trims or drops leave the support, so the file shrinks with
the density; the smaller support is then stored explicitly and needs the base for its
fingerprints. Without a sparsifying density (or with one of 1) the output support is the union,
so a merge of seeded adapters sharing seed and density stays seeded. Sums are order-independent: the
terms of each index are sorted before they are added, so any input order gives the same bits. The
DARE draws come from ``numpy.random.default_rng([seed, fnv1a64(tensor name)])``, one
``random(count_i)`` per adapter in input order (`dare_keep`).

Base check: a fingerprint covers only its adapter's support, so two fingerprints are comparable
only when the supports are identical; elsewhere the adapters must agree on shapes, dtypes and the
recorded base identity (name and numel), and — when `base` is given — every input is verified
against it. A union support that is new (equal to no input's: adapters of different seeds) needs
base values for its fingerprint, so it requires `base`; every check runs before any merging.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ops
from ..adapter import Adapter, TensorDelta
from ..checkpoint import Checkpoint, open_checkpoint
from ..dtypes import bit_view, dtype_name
from ..errors import SpraError
from ..fingerprint import fingerprints
from ..support import ExplicitSupport, SeededSupport, Support, fnv1a64
from .checks import check_fits, refuse_nonfinite
from .methods import DEFAULT_METHOD, MergeMethod, merge_method
from .recipe import MergeRequest


def dare_keep(seed: int, name: str, counts: list[int], density: list[float]) -> list[np.ndarray]:
    """DARE's keep masks for one tensor: one bool array per input, drawn in input order."""
    rng = np.random.default_rng([int(seed), fnv1a64(name.encode("utf-8"))])
    return [rng.random(c) < d for c, d in zip(counts, density)]


def magnitude_keep(values: np.ndarray, density: float) -> np.ndarray:
    """Mask of the ``int(density * n)`` largest |values| (ties broken by position, lower first)."""
    k = int(density * values.size)
    keep = np.zeros(values.size, dtype=bool)
    if k >= values.size:
        keep[:] = True
    elif k > 0:
        keep[np.argsort(-np.abs(values), kind="stable")[:k]] = True
    return keep


def merge_adapters(
    adapters: list[Adapter],
    method: str = DEFAULT_METHOD,
    weights: list[float] | None = None,
    density: float | list[float] | None = None,
    seed: int = 0,
    base: Checkpoint | None = None,
    names: list[str] | None = None,
) -> tuple[Adapter, dict]:
    """Merge `adapters` (all of one base) into one; returns (adapter, report).

    `method`: a name or alias of methods.METHODS. `weights`: one float per adapter (required by
    ``weighted``). `density`: the fraction of each adapter's own values kept by the trimming and
    dropping methods, one float or one per adapter (default 1.0). `seed`: of DARE's draws.
    `base`: needed for a new support's fingerprints (a union no input's support holds, or what is
    left after a density below 1 drops values), and then also used to verify every input. `names`: labels of the inputs (paths) for the provenance.

    The report: ``{"tensors": {name: {overlap, sign_conflicts, dropped, norms, out_norm}},
    "overlap", "sign_conflicts", "values", "dropped", "new_supports"}`` — overlap counts indices in
    more than one adapter, sign_conflicts those of them with both a positive and a negative input
    value, dropped the indices of the union that left the support (every input holding them trimmed
    or dropped them; a tensor left with none is omitted), norms the fp32 L2 norm of each input's
    values (None where an input lacks the tensor).
    """
    spec = merge_method(method)
    n = len(adapters)
    if n == 0:
        raise SpraError("nothing to merge: no adapters given")
    if names is not None and len(names) != n:
        raise ValueError("names must give one label per adapter")
    w = spec.check_weights(weights, n)
    d = spec.check_density(density, n)
    if base is None and spec.sparsify != "none" and min(d) < 1.0:
        raise SpraError(
            f"merge method {spec.name!r} at density {min(d)} removes the values it drops from the support, and "
            "the fingerprints of the smaller support need the base weights: add --base BASE, the checkpoint the "
            "adapters were made on"
        )
    if base is None:  # with a base, every adapter is verified against it below
        _check_bases(adapters, names)
    for i, a in enumerate(adapters):
        refuse_nonfinite(a, _label(names, i), "merge")
    all_names = list(dict.fromkeys(t for a in adapters for t in a.deltas))
    members_of = {t: [(i, a.deltas[t]) for i, a in enumerate(adapters) if t in a.deltas] for t in all_names}
    for tname, members in members_of.items():
        _check_tensor(tname, members, names)
        if base is None:
            _refuse_new_support(tname, members, names)
    if base is not None:
        _verify_against(base, adapters, names)

    deltas, report = {}, {}
    totals = {"overlap": 0, "sign_conflicts": 0, "values": 0, "dropped": 0, "new_supports": 0}
    for tname, members in members_of.items():
        delta, entry, new = _merge_tensor(tname, members, n, spec, w, d, seed, base)
        if delta.count:
            deltas[tname] = delta
        report[tname] = entry
        totals["overlap"] += entry["overlap"]
        totals["sign_conflicts"] += entry["sign_conflicts"]
        totals["values"] += delta.count
        totals["dropped"] += entry["dropped"]
        totals["new_supports"] += int(new)

    dense = _merge_dense(adapters, members_of, names)
    exact = (
        spec.plain_sum
        and all(x == 1.0 for x in w)
        and all(a.exact for a in adapters)
        and totals["overlap"] == 0
        and not any(a.dense for a in adapters)
    )
    parents = [
        {"source": names[i] if names else None, "base": a.base.get("name"), "provenance": a.provenance}
        for i, a in enumerate(adapters)
    ]
    provenance = {
        "method": "merge",
        "merge_method": spec.name,
        "parents": parents,
        "weights": weights if weights is None else [float(x) for x in weights],
        "density": density if density is None or isinstance(density, (int, float)) else d,
        "seed": seed,
    }
    tasks = [a.task for a in adapters]
    task = tasks[0] if all(t == tasks[0] for t in tasks) else {}
    out_base = base.identity() if base is not None else dict(adapters[0].base)
    # Any parent's recorded size (they agree: `_check_bases`), so `info` can give the fraction of the model.
    out_base.setdefault("numel", next((a.base["numel"] for a in adapters if a.base.get("numel")), None))
    merged = Adapter(deltas, dense, out_base, task, provenance, exact=exact)
    return merged, {"tensors": report, **totals}


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _label(names, i: int) -> str:
    return names[i] if names else f"adapter #{i + 1}"


def _check_bases(adapters: list[Adapter], names) -> None:
    """Recorded base sizes must agree where present. Recorded names are only descriptive (one base
    may be a Hub id, a local copy or a path spelled another way): the fingerprints decide."""
    for key in ("numel",):
        seen = [(i, a.base[key]) for i, a in enumerate(adapters) if a.base.get(key) is not None]
        for i, value in seen[1:]:
            if value != seen[0][1]:
                raise SpraError(
                    f"adapters of different bases: {_label(names, seen[0][0])} records base {key} "
                    f"{seen[0][1]!r}, {_label(names, i)} records {value!r}"
                )


def _verify_against(base: Checkpoint, adapters: list[Adapter], names) -> None:
    for i, a in enumerate(adapters):
        check_fits(base, a, _label(names, i))


def _refuse_new_support(name: str, members: list[tuple[int, TensorDelta]], names) -> None:
    """Refuse, before any merging, a tensor whose union support is new (no input's holds all the
    others'): the fingerprints of a new support need the base weights."""
    (i0, first), rest = members[0], members[1:]
    odd = next((i for i, t in rest if not _same_support(t.support, first.support)), None)
    if odd is None:
        return
    union = np.unique(np.concatenate([ops.support_indices(t.support).numpy() for _, t in members]))
    if all(t.count != union.size for _, t in members):
        raise SpraError(
            f"tensor {name!r} has different supports in {_label(names, i0)} and {_label(names, odd)} (different "
            "seeds?), so the merged support is new and its fingerprints need the base weights: add --base BASE, "
            "the checkpoint the adapters were made on"
        )


def _same_support(a: Support, b: Support) -> bool:
    if isinstance(a, SeededSupport) and isinstance(b, SeededSupport):
        return a == b
    if isinstance(a, ExplicitSupport) and isinstance(b, ExplicitSupport):
        return a.numel == b.numel and np.array_equal(a.flat, b.flat)
    return False


def _check_tensor(name: str, members: list[tuple[int, TensorDelta]], names) -> None:
    i0, first = members[0]
    for i, t in members[1:]:
        if t.shape != first.shape:
            raise SpraError(
                f"tensor {name!r} has shape {list(t.shape)} in {_label(names, i)} but "
                f"{list(first.shape)} in {_label(names, i0)}: adapters of different bases"
            )
        if t.dtype != first.dtype:
            raise SpraError(
                f"tensor {name!r} has base dtype {dtype_name(t.dtype)} in {_label(names, i)} but "
                f"{dtype_name(first.dtype)} in {_label(names, i0)}: adapters of different bases"
            )
    for k, (i, a) in enumerate(members):
        for j, b in members[k + 1 :]:
            if _same_support(a.support, b.support):
                common = set(a.fingerprint) & set(b.fingerprint)
                if any(a.fingerprint[c] != b.fingerprint[c] for c in common):
                    raise SpraError(
                        f"tensor {name!r}: {_label(names, i)} and {_label(names, j)} fingerprint different "
                        "base values at the same support: adapters of different bases"
                    )


# ---------------------------------------------------------------------------------------------
# One tensor
# ---------------------------------------------------------------------------------------------


def _out_values_dtype(members) -> torch.dtype:
    dtypes = {t.values.dtype for _, t in members}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _merge_tensor(name, members, n, spec: MergeMethod, w, d, seed, base):
    """(merged TensorDelta, report entry, whether the support is new) for one tensor (checked, and
    `base` given if its support is new)."""
    first = members[0][1]
    supports = [t.support for _, t in members]
    if all(_same_support(s, supports[0]) for s in supports[1:]):
        # Shared support: the values line up; no index work at all.
        support, fp, union = supports[0], first.fingerprint, None
        matrix = torch.stack([t.values.to(torch.float32) for _, t in members])  # [m, count]
        present = None
    else:
        idx = [ops.support_indices(s).numpy() for s in supports]
        union = np.unique(np.concatenate(idx))
        owner = next((k for k, s in enumerate(supports) if s.count == union.size), None)
        matrix = torch.zeros(len(members), union.size, dtype=torch.float32)  # [m, union]
        present = torch.zeros(len(members), union.size, dtype=torch.bool)
        for k, ((_, t), flat) in enumerate(zip(members, idx)):
            pos = torch.from_numpy(np.searchsorted(union, flat))
            matrix[k, pos] = t.values.to(torch.float32)
            present[k, pos] = True
        support, fp = (supports[owner], members[owner][1].fingerprint) if owner is not None else (None, None)

    entry = _stats(matrix, present)
    rows = [i for i, _ in members]
    kept = _sparsify(spec, name, matrix, present, rows, d, seed)
    combined = _combine(spec, matrix, rows, w)
    entry["norms"] = _norms(members, n)
    entry["out_norm"] = float(torch.linalg.vector_norm(combined))
    survivors = None if kept is None else kept.any(0)  # [U]: indices some input keeps
    entry["dropped"] = 0 if survivors is None else int((~survivors).sum())
    if entry["dropped"]:
        flat = (ops.support_indices(support).numpy() if union is None else union)[survivors.numpy()]
        support, combined = None, combined[survivors]
    else:
        flat = union
    new = support is None
    if new:  # the union, or what is left of it: fingerprinted on the base
        support = ExplicitSupport(first.numel, flat)
        fp = fingerprints(ops.gather(base.view(name), torch.from_numpy(flat)))
    values = combined.to(_out_values_dtype(members))
    if not bool(torch.isfinite(values).all()):
        raise SpraError(f"tensor {name!r}: the merged values overflow {dtype_name(values.dtype)} (Inf)")
    return TensorDelta(name, first.shape, first.dtype, support, values, dict(fp)), entry, new


def _stats(matrix: torch.Tensor, present: torch.Tensor | None) -> dict:
    """Overlap and sign conflicts over a [m, U] matrix (present: which entries an input holds)."""
    if matrix.shape[0] < 2:
        return {"overlap": 0, "sign_conflicts": 0}
    counts = present.sum(0) if present is not None else None
    overlapping = counts > 1 if counts is not None else torch.ones(matrix.shape[1], dtype=torch.bool)
    positive = (matrix > 0).any(0)
    negative = (matrix < 0).any(0)
    conflicts = overlapping & positive & negative
    return {"overlap": int(overlapping.sum()), "sign_conflicts": int(conflicts.sum())}


def _norms(members, n: int) -> list[float | None]:
    norms: list[float | None] = [None] * n
    for i, t in members:
        norms[i] = float(torch.linalg.vector_norm(t.values.to(torch.float32)))
    return norms


def _ordered_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 after sorting each column: the same bits for any order of the rows."""
    if terms.shape[0] > 2:
        terms = torch.from_numpy(np.sort(terms.numpy(), axis=0))  # numpy's is ~2.5x torch's here
    return terms.sum(0)


def _sparsify(spec: MergeMethod, name, matrix, present, rows, d, seed) -> torch.Tensor | None:
    """Zero, in place, the values of each input [m, U] that its sparsifier drops (rows: the inputs'
    adapter numbers; present: which entries each holds, None when all share one support); DARE
    rescales the kept ones by 1/density. Returns which entries survive [m, U] (None: all held)."""
    if spec.sparsify == "none":
        return None
    own = [
        np.arange(matrix.shape[1]) if present is None else torch.nonzero(present[k]).squeeze(1).numpy()
        for k in range(len(rows))
    ]  # each input's own values, in support order
    if spec.sparsify == "magnitude":
        keep = [magnitude_keep(matrix[k].numpy()[pos], d[i]) for k, (i, pos) in enumerate(zip(rows, own))]
    else:
        keep = dare_keep(seed, name, [pos.size for pos in own], [d[i] for i in rows])
    kept = torch.zeros(matrix.shape, dtype=torch.bool)
    for k, i in enumerate(rows):
        row = matrix[k].numpy()
        row[own[k][~keep[k]]] = 0.0
        kept[k, torch.from_numpy(own[k][keep[k]])] = True
        if spec.sparsify == "random" and d[i] < 1.0:
            row /= np.float32(d[i])
    return kept


def _combine(spec: MergeMethod, matrix, rows, w) -> torch.Tensor:
    """The merged fp32 values [U] from the (sparsified) inputs' values [m, U]."""
    weight = torch.tensor([w[i] for i in rows], dtype=torch.float32)[:, None]  # [m, 1]
    weighted = matrix * weight if any(w[i] != 1.0 for i in rows) else matrix
    if not spec.consensus:
        total = _ordered_sum(weighted)
        return total / torch.tensor(sum(w), dtype=torch.float32) if spec.normalize else total
    # TIES consensus: the sign of the (weighted) sum, 0 counting as positive.
    majority = torch.where(_ordered_sum(weighted) >= 0, 1.0, -1.0)
    agree = torch.sign(weighted) == majority
    mixed = _ordered_sum(torch.where(agree, weighted, 0.0))
    if not spec.normalize:
        return mixed
    divisor = _ordered_sum(torch.where(agree, weight.expand_as(weighted), 0.0))
    return mixed / torch.where(divisor == 0, 1.0, divisor)


def _merge_dense(adapters: list[Adapter], sparse: dict, names) -> dict[str, torch.Tensor]:
    """Dense tensors pass through; the same name twice must hold the same bits."""
    dense: dict[str, torch.Tensor] = {}
    for i, a in enumerate(adapters):
        for tname, t in a.dense.items():
            if tname in sparse:
                raise SpraError(f"tensor {tname!r} is dense in {_label(names, i)} but sparse in another adapter")
            if tname in dense and not (
                dense[tname].dtype == t.dtype and torch.equal(bit_view(dense[tname]), bit_view(t))
            ):
                raise SpraError(f"dense tensor {tname!r} differs between adapters: cannot merge replacements")
            dense.setdefault(tname, t)
    return dense


def merge_files(request: MergeRequest) -> tuple[Adapter, dict]:
    """Merge the adapter files a request names (its base opened when it names one); returns
    (adapter, report) as `merge_adapters`."""
    if len(request.paths) < 2:
        raise SpraError("merge needs at least two adapters (arguments or the recipe's models)")
    base = open_checkpoint(request.base) if request.base else None
    adapters = [Adapter.load(p) for p in request.paths]
    return merge_adapters(
        adapters, request.method, request.weights, request.density, request.seed, base, list(request.paths)
    )


__all__ = ["dare_keep", "magnitude_keep", "merge_adapters", "merge_files"]
