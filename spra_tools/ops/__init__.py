"""One front for every kernel: support generation, gather, scatter-apply and exact restore.

The backend is chosen per call from ``SPRA_BACKEND`` (auto|reference|cpu|cuda; auto = the fastest
available for the tensor's device). Every backend gives bit-identical results; the pure-torch
`reference` backend defines them and is always available.

Scatter-apply semantics, for every backend and weight dtype (fp32 / bf16 / fp16):
``W[s] = cast_to_W(fp32(W[s]) + fp32(scale) * fp32(v))``, each operation rounded to fp32 (no
fused multiply-add), the final cast round-to-nearest-even. With scale == 1 the product is skipped.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import numpy as np
import torch

from ..errors import SpraError
from ..support import ExplicitSupport, SeededSupport, Support, tensor_key
from . import extension
from .library import DEFAULTS, as_key

BACKENDS = ("auto", "reference", "cpu", "cuda")


def compiled_backends(build: bool = False) -> dict[str, str]:
    """Status of each compiled backend: "ok" or the reason it is unavailable (builds only if asked)."""
    return {kind: extension.load(kind, build) for kind in extension.KINDS}


def backend_for(device: torch.device | str, build: bool = True) -> str:
    """The backend that serves tensors on `device` under the current SPRA_BACKEND.

    With `build`, a compiled backend not yet built is built now (once; cached)."""
    choice = os.environ.get("SPRA_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise SpraError(f"SPRA_BACKEND={choice!r} is not one of {', '.join(BACKENDS)}")
    device_type = torch.device(device).type
    if choice == "auto":
        usable = device_type in extension.KINDS and extension.load(device_type, build) == "ok"
        return device_type if usable else "reference"
    if choice == "reference":
        return "reference"
    status = extension.load(choice, build)
    if status != "ok":
        raise SpraError(f"SPRA_BACKEND={choice} is unavailable ({status})")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SpraError("SPRA_BACKEND=cuda is unavailable (no CUDA device is visible)")
    return choice


def _op(name: str, device) -> Callable:
    """The kernel of op `name` for tensors on `device`: the reference, the compiled kernel of that
    device, or — when SPRA_BACKEND names another device — that device's kernel on copies."""
    backend = backend_for(device)
    if backend == "reference":
        return DEFAULTS[name]
    op = getattr(torch.ops.spra_tools, name)
    if backend == torch.device(device).type:
        return op
    return functools.partial(_run_on, op, torch.device(backend), name in _MUTATING)


_MUTATING = {"seeded_apply", "seeded_restore", "scatter_apply", "restore"}  # their first argument


def _run_on(op, device: torch.device, mutates: bool, *args):
    """Run `op` with its tensors copied to `device`; copy a mutated first argument (the weights) back."""

    def move(a):
        if isinstance(a, torch.Tensor):
            return a.to(device)
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return [t.to(device) for t in a]
        return a

    moved = [move(a) for a in args]
    result = op(*moved)
    weights, copies = (args[0], moved[0]) if isinstance(args[0], list) else ([args[0]], [moved[0]])
    if mutates:
        for w, c in zip(weights, copies):
            w.copy_(c)
    return result.to(weights[0].device) if isinstance(result, torch.Tensor) else result


def support_indices(support: Support, device: torch.device | str = "cpu") -> torch.Tensor:
    """The support's sorted int64 flat indices as a tensor on `device`."""
    if isinstance(support, ExplicitSupport):
        return torch.from_numpy(support.flat).to(device)
    assert isinstance(support, SeededSupport)
    if backend_for(device) == "reference" and torch.device(device).type == "cpu":
        return torch.from_numpy(support.indices())  # the numpy spec: the fastest reference on CPU
    return _op("seeded_indices", device)(
        torch.empty(0, device=device), [_key(support)], [support.numel], [float(support.density)]
    )


def _key(support: SeededSupport) -> int:
    return as_key(tensor_key(support.seed, support.name))


def _seeded_args(weights: list[torch.Tensor], supports: list[SeededSupport]):
    if len(weights) != len(supports) or not weights:
        raise ValueError("need one seeded support per weight, and at least one weight")
    for w, s in zip(weights, supports):
        if not w.is_contiguous() or w.numel() != s.numel:
            raise ValueError(f"weight for {s.name!r} must be contiguous with {s.numel} elements")
        if w.dtype != weights[0].dtype or w.device != weights[0].device:
            raise ValueError("weights of one call must share dtype and device")
    return [_key(s) for s in supports], [float(s.density) for s in supports]


def gather_seeded(weights: list[torch.Tensor], supports: list[SeededSupport]) -> torch.Tensor:
    """Weights at their seeded supports, flat in tensor order — one launch for all tensors."""
    keys, densities = _seeded_args(weights, supports)
    return _op("seeded_gather", weights[0].device)(weights, keys, densities)


def apply_seeded(
    weights: list[torch.Tensor],
    supports: list[SeededSupport],
    values: torch.Tensor,
    scale: float = 1.0,
    save_originals: bool = True,
) -> torch.Tensor:
    """In place, all tensors in one launch: ``W[s] = cast(W[s] + scale * v)``, supports regenerated
    from their seeds on the fly. `values` is flat in tensor order; returns the originals (flat,
    weight dtype) for an exact `restore_seeded`, or an empty tensor."""
    keys, densities = _seeded_args(weights, supports)
    if values.dim() != 1 or values.numel() != sum(s.count for s in supports) or values.device != weights[0].device:
        raise ValueError("values must be 1-D, on the weights' device, one per support element")
    return _op("seeded_apply", weights[0].device)(weights, keys, densities, values, float(scale), save_originals)


def restore_seeded(weights: list[torch.Tensor], supports: list[SeededSupport], originals: torch.Tensor) -> None:
    """In place: put back the originals returned by apply_seeded — bit-exact."""
    keys, densities = _seeded_args(weights, supports)
    if originals.dtype != weights[0].dtype or originals.numel() != sum(s.count for s in supports):
        raise ValueError("originals must be what apply_seeded returned for these weights")
    _op("seeded_restore", weights[0].device)(weights, keys, densities, originals)


def gather(weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``W.flatten()[indices]`` in W's dtype."""
    return _op("gather", weight.device)(weight, indices)


def scatter_apply(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, scale: float = 1.0) -> None:
    """In place: ``W[s] = cast(W[s] + scale * v)`` with fp32 math (module docstring)."""
    _check(weight, indices, values)
    _op("scatter_apply", weight.device)(weight, indices, values, float(scale))


def restore(weight: torch.Tensor, indices: torch.Tensor, original: torch.Tensor) -> None:
    """In place: ``W[s] = original`` — exact undo of scatter_apply given the gathered originals."""
    _check(weight, indices, original)
    if original.dtype != weight.dtype:
        raise ValueError(f"restore needs originals in the weight dtype {weight.dtype}, got {original.dtype}")
    _op("restore", weight.device)(weight, indices, original)


def _check(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")
    if indices.dtype != torch.int64 or values.shape != indices.shape:
        raise ValueError(f"need int64 indices and values of the same length, got {indices.shape} and {values.shape}")


def indices_many(supports: list[Support], device: torch.device | str) -> torch.Tensor:
    """The supports' flat indices concatenated (seeded ones regenerated in one launch)."""
    if supports and all(isinstance(s, SeededSupport) for s in supports):
        if backend_for(device) == "reference" and torch.device(device).type == "cpu":
            return torch.from_numpy(np.concatenate([s.indices() for s in supports]))
        keys = [_key(s) for s in supports]
        return _op("seeded_indices", device)(
            torch.empty(0, device=device), keys, [s.numel for s in supports], [float(s.density) for s in supports]
        )
    parts = [support_indices(s, device) for s in supports]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=device)


def fingerprint(values: torch.Tensor) -> str:
    """format.fingerprint of float values (their raw bits, in order), computed where they live."""
    return fingerprint_many(values, [values.numel()])[0]


def fingerprint_many(values: torch.Tensor, counts: list[int]) -> list[str]:
    """fingerprint() of each consecutive segment of `values` (lengths `counts`), in one pass."""
    if values.device.type == "cpu":
        from ..adapter import raw_bits
        from ..format import fingerprint as numpy_fingerprint

        bits, out, offset = raw_bits(values), [], 0
        for c in counts:
            out.append(numpy_fingerprint(bits[offset : offset + c]))
            offset += c
        return out
    return _fingerprint_many_torch(values, counts)


def _fingerprint_many_torch(values: torch.Tensor, counts: list[int]) -> list[str]:
    from ..support import _GOLDEN
    from .reference import _mix64, _s64

    device, n = values.device, len(counts)
    width = values.element_size() * 8
    bits = values.contiguous().view(torch.int32 if width == 32 else torch.int16).to(torch.int64) & ((1 << width) - 1)
    sizes = torch.tensor(counts, dtype=torch.int64, device=device)
    owner = torch.repeat_interleave(torch.arange(n, device=device), sizes, output_size=values.numel())
    k = torch.arange(1, values.numel() + 1, device=device) - (torch.cumsum(sizes, 0) - sizes)[owner]
    sums = torch.zeros(n, dtype=torch.int64, device=device).index_add_(0, owner, _mix64(bits + k * _s64(_GOLDEN)))
    return [f"{s & ((1 << 64) - 1):016x}" for s in sums.tolist()]  # int64 sums wrap: exact mod 2**64
