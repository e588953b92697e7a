"""One front for every kernel: support generation, gather, scatter-apply and exact restore.

The backend is chosen per call from ``SPRA_BACKEND`` (auto|reference|cpu|cuda; auto = the fastest
available for the tensor's device). Every backend gives bit-identical results; the pure-torch
`reference` backend defines them and is always available.

Scatter-apply semantics, for every backend and weight dtype (fp32 / bf16 / fp16):
``W[s] = cast_to_W(fp32(W[s]) + fp32(scale) * fp32(v))``, each operation rounded to fp32 (no
fused multiply-add), the final cast round-to-nearest-even. With scale == 1 the product is skipped.
"""

from __future__ import annotations

import os

import torch

from ..errors import SpraError
from ..support import ExplicitSupport, SeededSupport, Support
from . import reference

BACKENDS = ("auto", "reference", "cpu", "cuda")


def compiled_backends() -> dict[str, str]:
    """Status of each compiled backend: "ok" or the reason it is unavailable."""
    reason = "not built: this version of spra-tools ships the reference backend only"
    return {"cpu": reason, "cuda": reason}


def backend_for(device: torch.device | str) -> str:
    """The backend that serves tensors on `device` under the current SPRA_BACKEND."""
    choice = os.environ.get("SPRA_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise SpraError(f"SPRA_BACKEND={choice!r} is not one of {', '.join(BACKENDS)}")
    device_type = torch.device(device).type
    if choice == "auto":
        return device_type if compiled_backends().get(device_type) == "ok" else "reference"
    if choice == "reference":
        return "reference"
    status = compiled_backends()[choice]
    if status != "ok":
        raise SpraError(f"SPRA_BACKEND={choice} is unavailable ({status})")
    if choice != device_type:
        raise SpraError(f"SPRA_BACKEND={choice} cannot serve tensors on {device_type}")
    return choice


def support_indices(support: Support, device: torch.device | str = "cpu") -> torch.Tensor:
    """The support's sorted int64 flat indices as a tensor on `device`."""
    if isinstance(support, ExplicitSupport):
        return torch.from_numpy(support.flat).to(device)
    assert isinstance(support, SeededSupport)
    backend_for(device)
    if torch.device(device).type == "cpu":
        # On CPU the numpy spec is the fastest reference implementation.
        return torch.from_numpy(support.indices())
    return reference.seeded_indices(support.seed, support.name, support.numel, support.density, device)


def gather(weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``W.flatten()[indices]`` in W's dtype."""
    backend_for(weight.device)
    return reference.gather(weight, indices)


def scatter_apply(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, scale: float = 1.0) -> None:
    """In place: ``W[s] = cast(W[s] + scale * v)`` with fp32 math (module docstring)."""
    _check(weight, indices, values)
    backend_for(weight.device)
    reference.scatter_apply(weight, indices, values, float(scale))


def restore(weight: torch.Tensor, indices: torch.Tensor, original: torch.Tensor) -> None:
    """In place: ``W[s] = original`` — exact undo of scatter_apply given the gathered originals."""
    _check(weight, indices, original)
    if original.dtype != weight.dtype:
        raise ValueError(f"restore needs originals in the weight dtype {weight.dtype}, got {original.dtype}")
    backend_for(weight.device)
    reference.restore(weight, indices, original)


def _check(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")
    if indices.dtype != torch.int64 or values.shape != indices.shape:
        raise ValueError(f"need int64 indices and values of the same length, got {indices.shape} and {values.shape}")


__all__ = ["backend_for", "compiled_backends", "gather", "restore", "scatter_apply", "support_indices"]
