"""Adapters against base checkpoints: create a seeded adapter, verify it, apply it to a new checkpoint."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from . import ops
from .adapter import Adapter, TensorDelta
from .checkpoint import Checkpoint, task_config, write_checkpoint
from .dtypes import TORCH_DTYPES, dtype_name
from .errors import MismatchError, SpraError
from .fingerprint import fingerprints
from .support import SeededSupport
from .targets import select


def create_adapter(
    ckpt: Checkpoint,
    density: float,
    seed: int,
    targets=("vo",),
    exclude=(),
    values_dtype: str = "BF16",
    progress: bool = False,
) -> Adapter:
    """A zero-valued seeded adapter over the targeted tensors, fingerprinted against `ckpt`."""
    from tqdm import tqdm

    names = select(((n, ckpt.info(n).dtype, ckpt.info(n).shape) for n in ckpt.names()), targets, exclude, ckpt.name)
    deltas = {}
    for name in tqdm(names, desc="reading base", disable=not progress, leave=False):
        info = ckpt.info(name)
        try:
            support = SeededSupport(seed, name, info.numel, density)
        except ValueError as e:
            raise SpraError(str(e)) from None
        weight = ckpt.view(name)
        idx = ops.support_indices(support)
        values = torch.zeros(support.count, dtype=TORCH_DTYPES[values_dtype])
        deltas[name] = TensorDelta(
            name, info.shape, weight.dtype, support, values, fingerprints(ops.gather(weight, idx))
        )
    provenance = {
        "method": "create",
        "seed": seed,
        "density": density,
        "targets": list(targets),
        "exclude": list(exclude),
    }
    return Adapter(deltas, {}, ckpt.identity(), {}, provenance, exact=True)


def verify_adapter(ckpt: Checkpoint, adapter: Adapter, progress: bool = False) -> list[str]:
    """Every way `adapter` does not fit `ckpt` (empty when it fits): names, shapes, dtypes, fingerprints."""
    from tqdm import tqdm

    problems = _structure_problems(ckpt, adapter)
    for name, delta in tqdm(adapter.deltas.items(), desc="verifying", disable=not progress, leave=False):
        if name not in problems:
            weight = ckpt.view(name)
            why = delta.mismatch(weight, ops.gather(weight, delta.indices()))
            if why:
                problems[name] = why
    return [f"tensor {name!r}: {why}" for name, why in problems.items()]


def _structure_problems(ckpt: Checkpoint, adapter: Adapter) -> dict[str, str]:
    """Tensor name -> what is wrong, for names, shapes and dtypes (no tensor data is read)."""
    problems = {n: ckpt.mismatch(n, d.shape, dtype_name(d.dtype)) for n, d in adapter.deltas.items()}
    shapes = {name: tuple(t.shape) for name, t in adapter.dense.items()}
    problems.update({n: ckpt.replacement_problem(n, shapes) for n in shapes})
    return {n: why for n, why in problems.items() if why}


def apply_adapter(
    ckpt: Checkpoint,
    adapters: list[tuple[str, Adapter]],
    out: str | os.PathLike,
    scale: float = 1.0,
    overwrite: bool = False,
    progress: bool = False,
    allow_nonfinite: bool = False,
) -> dict:
    """Write ``base + scale * adapter`` (adapters applied in order) as a new checkpoint at `out`.

    Each adapter is checked before anything is written (names, shapes, dtypes) and each tensor's
    fingerprint before that tensor is written; a mismatch aborts and leaves no output. An adapter
    may fingerprint either the base or the weights it lands on (a chain trained on base + earlier
    adapters). A trained adapter's task sets the written config's ``architectures`` (the class
    that trained it) and a classifier's labels, so transformers loads the result as that model.
    Returns timing and size statistics.
    """
    for path, adapter in adapters:
        ckpt.check_fits({n: (d.shape, dtype_name(d.dtype)) for n, d in adapter.deltas.items()}, path)
        shapes = {n: tuple(t.shape) for n, t in adapter.dense.items()}
        for name in shapes:
            if why := ckpt.replacement_problem(name, shapes):
                raise MismatchError(f"tensor {name!r}: {why}", path)
        if not allow_nonfinite:
            adapter.check_finite(path, "--allow-nonfinite")
    edited = {n for _, a in adapters for n in a.deltas}
    dense = {n: t for _, a in adapters for n, t in a.dense.items()}

    def edit(name: str, weight: torch.Tensor) -> None:
        touching = [(p, a.deltas[name]) for p, a in adapters if name in a.deltas]
        original = weight.clone() if len(touching) > 1 else weight
        for path, delta in touching:
            idx = delta.indices(weight.device)
            current = ops.gather(weight, idx)
            why = delta.mismatch(weight, current)
            if why and (original is weight or delta.mismatch(weight, ops.gather(original, idx))):
                raise MismatchError(f"tensor {name!r}: {why}", path)
            ops.scatter_apply(weight, idx, delta.values, scale)
            if (
                not allow_nonfinite
                and bool(torch.isfinite(current).all())
                and not bool(torch.isfinite(ops.gather(weight, idx)).all())
            ):
                raise SpraError(
                    f"tensor {name!r}: applying overflows {dtype_name(weight.dtype)} (Inf/NaN result)", path
                )

    t0 = time.perf_counter()
    config = task_config([a.task for _, a in adapters])
    inputs = tuple(path for path, _ in adapters)
    write_checkpoint(
        ckpt, out, edit, edited, dense, overwrite=overwrite, progress=progress, config=config, inputs=inputs
    )
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "tensors": len(edited),
        "values": sum(a.num_values for _, a in adapters),
        "out": str(Path(out)),
    }
