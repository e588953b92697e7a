"""Extract an adapter from a fine-tuned checkpoint: exactly the changed elements, or the largest |Δ|.

Exactness: for every changed element the stored value v satisfies
``cast_W(fp32(w) + fp32(v)) == t`` bit for bit (the apply rule, scale 1). The value is the
difference ``t - w`` rounded to the values dtype, nudged by up to two steps of that dtype when
rounding lands beside the target; a tensor whose changes bf16/fp16 values cannot express is
stored with fp32 values, and one that not even fp32 can express (a change across ~2**24 orders of
magnitude, or to -0.0) is stored densely. The report says which tensors needed either.
"""

from __future__ import annotations

import torch

from .. import ops
from ..adapter import Adapter, explicit_delta
from ..checkpoint import Checkpoint
from ..dtypes import TORCH_DTYPES, bit_view
from ..errors import SpraError
from ..support import seeded_count
from ..targets import select
from .checks import checked_density

_STEPS = 2


def _lands(w: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mask of elements where applying v to w gives exactly t (compared bit for bit)."""
    got = (w.to(torch.float32) + v.to(torch.float32)).to(w.dtype)
    return bit_view(got) == bit_view(t)


def exact_values(w: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Values in `dtype` with apply(w, v) == t exactly for every element, or None if impossible."""
    v = (t.to(torch.float32) - w.to(torch.float32)).to(dtype)
    bad = ~_lands(w, v, t)
    for direction in (float("inf"), float("-inf")):
        if not bool(bad.any()):
            break
        idx = torch.nonzero(bad).squeeze(1)
        trial = v[idx]
        for _ in range(_STEPS):
            trial = torch.nextafter(trial, torch.full_like(trial, direction))
            ok = _lands(w[idx], trial, t[idx])
            v[idx[ok]] = trial[ok]
            bad[idx[ok]] = False
    return None if bool(bad.any()) else v


def diff_checkpoints(
    base: Checkpoint,
    tuned: Checkpoint,
    density: float | None = None,
    targets=("all",),
    exclude=(),
    values_dtype: str = "BF16",
    progress: bool = False,
) -> tuple[Adapter, dict]:
    """The adapter taking `base` to `tuned`, and a report {tensors: {name: {...}}, ...}.

    Without `density`, apply(base, adapter) reproduces `tuned` bit-exactly. With it, each tensor
    keeps its ``floor(density * numel)`` largest changes and the report gives the retained
    fraction of ||Δ||².
    """
    from tqdm import tqdm

    if density is not None:
        checked_density(density)
    preferred = TORCH_DTYPES[values_dtype]
    candidates = [(n, tuned.info(n).dtype, tuned.info(n).shape) for n in tuned.names()]
    names = select(candidates, targets, exclude, tuned.name)
    deltas, dense, report = {}, {}, {}
    kept_energy = total_energy = 0.0
    for name in tqdm(names, desc="diffing", disable=not progress, leave=False):
        t = tuned.view(name)
        if (
            name not in base
            or base.info(name).shape != tuple(t.shape)
            or base.info(name).dtype != tuned.info(name).dtype
        ):
            dense[name] = t
            report[name] = {
                "stored": "dense",
                "why": "not in the base" if name not in base else "shape or dtype changed",
            }
            continue
        w = base.view(name)
        flat_w, flat_t = w.reshape(-1), t.reshape(-1)
        changed = torch.nonzero(bit_view(flat_w) != bit_view(flat_t)).squeeze(1)
        if changed.numel() == 0:
            continue
        delta = flat_t[changed].to(torch.float32) - flat_w[changed].to(torch.float32)
        energy = float(delta.double().square().sum())
        entry = {"changed": changed.numel(), "numel": w.numel()}
        if density is not None:
            k = min(seeded_count(w.numel(), density), changed.numel())
            keep = torch.topk(delta.abs(), k, sorted=False).indices if k < changed.numel() else None
            if keep is not None:
                keep = keep.sort().values
                changed, delta = changed[keep], delta[keep]
            kept = float(delta.double().square().sum())
            kept_energy, total_energy = kept_energy + kept, total_energy + energy
            entry["retained"] = kept / energy if energy else 1.0
            values = delta.to(preferred)
        else:
            values = exact_values(flat_w[changed], flat_t[changed], preferred)
            if values is None and preferred != torch.float32:
                values = exact_values(flat_w[changed], flat_t[changed], torch.float32)
                entry["values"] = "F32 (needed for exactness)"
            if values is None:
                dense[name] = t
                report[name] = {**entry, "stored": "dense", "why": "changes not expressible as sparse values"}
                continue
        if changed.numel() == 0:
            continue
        idx = changed.numpy()
        deltas[name] = explicit_delta(name, tuple(w.shape), w.dtype, idx, values, ops.gather(w, changed))
        report[name] = {**entry, "stored": "sparse", "count": int(changed.numel())}
    if not deltas and not dense:
        raise SpraError("the checkpoints are identical on the targeted tensors: nothing to extract", tuned.path)
    provenance = {
        "method": "diff",
        "tuned": {"name": tuned.name, "revision": tuned.revision},
        "density": density,
        "targets": list(targets),
        "exclude": list(exclude),
    }
    adapter = Adapter(deltas, dense, base.identity(), {}, provenance, exact=density is None)
    summary = {"tensors": report, "retained": (kept_energy / total_energy if total_energy else 1.0) if density else 1.0}
    return adapter, summary
