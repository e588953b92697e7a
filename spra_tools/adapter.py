"""The in-memory adapter: per adapted tensor a support, values and a base fingerprint; plus metadata.

`Adapter.load` / `Adapter.save` go through format.py; values live here as torch tensors.
Each tensor records fingerprints of the base values at its support (fingerprint.py), by which an
adapter recognises its base.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from . import format as fmt
from . import ops
from .dtypes import TORCH_DTYPES, dtype_name, from_raw, raw_bits
from .errors import SpraError
from .fingerprint import MISMATCH, fingerprints, mismatches
from .fsutil import atomic_path
from .support import ExplicitSupport, Support


@dataclass
class TensorDelta:
    """One adapted tensor: ``W.flatten()[support] += values``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # of the base tensor
    support: Support
    values: torch.Tensor  # [count], bf16 / fp16 / fp32
    fingerprint: dict[str, str]

    @property
    def count(self) -> int:
        return self.support.count

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def indices(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return ops.support_indices(self.support, device)

    def mismatch(self, weight: torch.Tensor, base_values: torch.Tensor, strict_dtype: bool = True) -> str | None:
        """Why `weight` (whose values at the support are `base_values`) is not this tensor's base, or None."""
        if tuple(weight.shape) != self.shape:
            return f"shape {tuple(weight.shape)} differs from the adapter's {self.shape}"
        if weight.dtype != self.dtype and strict_dtype:
            return f"dtype {dtype_name(weight.dtype)} differs from the adapter's {dtype_name(self.dtype)}"
        if mismatches(base_values, [base_values.numel()], [self.fingerprint])[0]:
            return MISMATCH
        return None


@dataclass
class Adapter:
    """A sparse adapter: deltas per tensor, optional dense tensors, and descriptive metadata."""

    deltas: dict[str, TensorDelta] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    base: dict = field(default_factory=dict)  # name, revision, numel (whole model)
    task: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    exact: bool = False  # apply reproduces the producer's weights bit-exactly

    @property
    def num_values(self) -> int:
        return sum(d.count for d in self.deltas.values())

    @property
    def num_adapted(self) -> int:
        """Elements of all adapted tensors (the denominator of the adapter's density)."""
        return sum(d.numel for d in self.deltas.values())

    def with_values_dtype(self, dtype: torch.dtype) -> Adapter:
        """The same adapter with its values stored in `dtype`; still `exact` only if no value changed."""
        deltas, same = {}, True
        for name, d in self.deltas.items():
            values = d.values.to(dtype)
            same = same and torch.equal(values.to(d.values.dtype), d.values)
            deltas[name] = TensorDelta(d.name, d.shape, d.dtype, d.support, values, d.fingerprint)
        return Adapter(deltas, dict(self.dense), self.base, self.task, self.provenance, self.exact and same)

    def check_finite(self, where: str | os.PathLike | None = None, accept_flag: str | None = None) -> None:
        """Refuse NaN/Inf values; `accept_flag` names the option that accepts them, where one exists."""
        hint = f" (pass {accept_flag} to accept)" if accept_flag else ""
        for d in self.deltas.values():
            if not bool(torch.isfinite(d.values).all()):
                raise SpraError(f"tensor {d.name!r} has NaN or Inf values{hint}", where)

    @classmethod
    def load(cls, path: str | os.PathLike, allow_nonfinite: bool = True) -> Adapter:
        path = os.fspath(path)
        f = fmt.read_spra(path)
        deltas = {}
        for r in f.tensors:
            values = from_raw(r.values, r.values_dtype)
            deltas[r.name] = TensorDelta(r.name, r.shape, TORCH_DTYPES[r.dtype], r.support, values, r.fingerprint)
        dense = {d.name: from_raw(d.array, d.dtype).reshape(d.array.shape) for d in f.dense}
        adapter = cls(deltas, dense, f.base, f.task, f.provenance, f.exact)
        if not allow_nonfinite:
            adapter.check_finite(path)
        return adapter

    def save(
        self, path: str | os.PathLike, overwrite: bool = False, allow_nonfinite: bool = False, inputs: tuple = ()
    ) -> None:
        """Write atomically; refuses NaN/Inf values unless allowed, and a `path` that is, holds or
        lies inside one of `inputs` (fsutil.check_output)."""
        if not allow_nonfinite:
            self.check_finite(path)
        records = [
            fmt.TensorRecord(
                d.name,
                d.shape,
                dtype_name(d.dtype),
                d.support,
                raw_bits(d.values),
                dtype_name(d.values.dtype),
                d.fingerprint,
            )
            for d in self.deltas.values()
        ]
        dense = [fmt.DenseRecord(n, dtype_name(t.dtype), raw_bits(t).reshape(t.shape)) for n, t in self.dense.items()]
        spra = fmt.SpraFile(records, dense, self.base, self.task, self.provenance, self.exact)
        with atomic_path(path, overwrite, inputs=inputs) as tmp:
            try:
                with open(tmp, "wb") as f:
                    fmt.write_spra(f, spra)
            except OSError as e:
                raise SpraError(f"cannot write ({e.strerror})", path) from None


def explicit_delta(
    name, shape, dtype, flat: np.ndarray, values: torch.Tensor, base_values: torch.Tensor
) -> TensorDelta:
    support = ExplicitSupport(math.prod(shape), flat)
    return TensorDelta(name, tuple(shape), dtype, support, values, fingerprints(base_values))
