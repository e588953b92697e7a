"""What the algebra verbs check of their inputs before any work: a density, whether an adapter
fits a base, whether its values are finite.

Names, shapes and dtypes come from the headers (no tensor data is read), and are checked before
anything is gathered at a support: a support indexes the flat tensor the adapter was made on, so
gathering it from a tensor of another shape would read out of bounds. Fingerprints then compare
the base values at each support.
"""

from __future__ import annotations

import os

import torch

from .. import ops
from ..adapter import Adapter
from ..checkpoint import Checkpoint
from ..dtypes import dtype_name
from ..errors import MismatchError, SpraError
from ..support import check_density


def checked_density(density: float) -> float:
    """`density` if it is one (in (0, 1], the seeded scheme's rule), else one SpraError line; every
    command taking --density validates it here."""
    try:
        check_density(density)
    except ValueError as e:
        raise SpraError(str(e)) from None
    return float(density)


def base_problems(base: Checkpoint, adapter: Adapter, fingerprints: bool = True) -> list[str]:
    """Every way `adapter` does not fit `base`, one "tensor 'name': why" line per tensor (empty when
    it fits); `fingerprints=False` checks names, shapes and dtypes only."""
    problems = []
    for name, d in adapter.deltas.items():
        if name not in base:
            why = "not in the base"
        elif base.info(name).shape != d.shape:
            why = f"shape {list(base.info(name).shape)} in the base, {list(d.shape)} in the adapter"
        elif base.info(name).dtype != dtype_name(d.dtype):
            why = f"dtype {base.info(name).dtype} in the base, {dtype_name(d.dtype)} in the adapter"
        elif fingerprints:
            weight = base.view(name)
            why = d.mismatch(weight, ops.gather(weight, d.indices()))
        else:
            why = None
        if why:
            problems.append(f"tensor {name!r}: {why}")
    shapes = {name: tuple(t.shape) for name, t in adapter.dense.items()}
    for name in shapes:
        why = base.replacement_problem(name, shapes)
        if why:
            problems.append(f"tensor {name!r}: {why}")
    return problems


def check_fits(base: Checkpoint, adapter: Adapter, where: str | os.PathLike | None, fingerprints: bool = True) -> None:
    """Raise one MismatchError line naming `where` unless `adapter` fits `base` (`base_problems`)."""
    problems = base_problems(base, adapter, fingerprints)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MismatchError(f"{problems[0]}{more}; is this the adapter's base?", where)


def refuse_nonfinite(adapter: Adapter, where: str | os.PathLike | None, verb: str) -> None:
    """NaN or Inf values would make every value they meet NaN or Inf: refused (these verbs, unlike
    apply, have no flag to accept them)."""
    for d in adapter.deltas.values():
        if not bool(torch.isfinite(d.values).all()):
            raise SpraError(f"tensor {d.name!r} has NaN or Inf values: cannot {verb} them", where)


__all__ = ["base_problems", "check_fits", "checked_density", "refuse_nonfinite"]
