"""`spra-tools apply` on files: adapters streamed into a copy of the base, without torch.

Applying adapters to a checkpoint on disk is a copy with a few elements changed on every page (at
0.1 % density, two per 4 KiB page of bf16), so it should cost what the copy costs: each shard is
read once, the adapted tensors pass through a small buffer where numpy changes them at their
supports, and each byte is written once (`checkpoint.stream_checkpoint`). Nothing here imports
torch, whose import alone takes longer than copying a 1 GB checkpoint: supports come from the numpy
spec (support.py), fingerprints from `fingerprint.fingerprint`, and the update is a numpy twin of
`ops.scatter_apply` — ``W[s] = cast(fp32(W[s]) + fp32(scale) * fp32(v))``, round to nearest even —
which is exact wherever the result is finite. Adapters with dense tensors, updates with a result
that is not finite (an overflow to refuse, a NaN in the base to carry), and runs that name a kernel
backend (SPRA_TOOLS_BACKEND) take the in-memory path of `surgery.apply_adapter`, which defines the
result; the output is the same bytes either way.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import format as fmt
from .checkpoint import Checkpoint, open_checkpoint, stream_checkpoint, task_config
from .errors import MismatchError, SpraError
from .fingerprint import MISMATCH, fingerprint


def apply_files(
    base: str | os.PathLike,
    adapter_paths: list[str],
    out: str | os.PathLike,
    scale: float = 1.0,
    revision: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    allow_nonfinite: bool = False,
) -> dict:
    """Write ``base + scale * adapter`` (the adapter files applied in order) as a new checkpoint at
    `out`: what `surgery.apply_adapter` writes, byte for byte, with the same checks and errors.

    Every adapter is read and validated, its values checked finite (unless `allow_nonfinite`), and
    its tensors' names, shapes and dtypes checked against the base before any output is written;
    each tensor's fingerprint is checked as it streams, and a mismatch leaves no output. Returns
    timing and size statistics.
    """
    files = []
    for path in adapter_paths:  # each read and checked in turn, as Adapter.load does
        f = fmt.read_spra(path)
        for r in f.tensors if not allow_nonfinite else ():
            if not np.isfinite(_as_float32(r.values, r.values_dtype)).all():
                raise SpraError(f"tensor {r.name!r} has NaN or Inf values (pass --allow-nonfinite to accept)", path)
        files.append((path, f))
    ckpt = open_checkpoint(base, revision)
    if any(f.dense for _, f in files) or _backend_chosen():
        return _apply_in_memory(ckpt, adapter_paths, out, scale, overwrite, progress, allow_nonfinite)
    for path, f in files:
        ckpt.check_fits({r.name: (r.shape, r.dtype) for r in f.tensors}, path)
    plan = _Plan.of(files, scale)
    t0 = time.perf_counter()
    try:
        config = task_config([f.task for _, f in files])
        stream_checkpoint(ckpt, out, plan.patch, plan.streamed(), overwrite, progress, config)
    except _NotFinite:
        return _apply_in_memory(ckpt, adapter_paths, out, scale, overwrite, progress, allow_nonfinite)
    return {
        "seconds": time.perf_counter() - t0,
        "tensors": len(plan.edits),
        "values": sum(r.support.count for _, f in files for r in f.tensors),
        "out": str(Path(out)),
    }


def _backend_chosen() -> bool:
    """Whether the environment names a kernel backend (`ops.backend_setting`'s variables, read here
    without importing torch): the in-memory path then runs on it, and refuses a name it does not know."""
    return any(
        os.environ.get(v, "").strip().lower() not in ("", "auto") for v in ("SPRA_TOOLS_BACKEND", "SPRA_BACKEND")
    )


def _apply_in_memory(ckpt: Checkpoint, adapter_paths, out, scale, overwrite, progress, allow_nonfinite) -> dict:
    from .adapter import Adapter
    from .surgery import apply_adapter

    adapters = [(path, Adapter.load(path)) for path in adapter_paths]
    return apply_adapter(ckpt, adapters, out, scale, overwrite, progress, allow_nonfinite)


class _NotFinite(Exception):
    """An update whose result is not finite: left to the in-memory path, which decides what it means."""


@dataclass
class _Edit:
    """One adapter's change of one tensor, and what the stream has gathered of it so far."""

    path: str
    record: fmt.TensorRecord
    scale: float
    indices: np.ndarray = field(init=False)  # int64 [count], sorted
    delta: np.ndarray = field(init=False)  # float32 [count]: fp32(scale) * fp32(v)
    current: np.ndarray = field(init=False)  # raw bits at the support just before this edit
    result: np.ndarray = field(init=False)  # raw bits at the support just after it
    original: np.ndarray | None = field(init=False)  # raw bits at the support in the base (chains only)
    done: int = 0  # support elements applied

    def start(self, width: int, chained: bool) -> None:
        r = self.record
        self.indices = r.support.indices()
        values = _as_float32(r.values, r.values_dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            self.delta = values if self.scale == 1.0 else values * np.float32(self.scale)
        if not np.isfinite(self.delta).all():
            raise _NotFinite
        self.current = np.empty(r.support.count, dtype=f"<u{width}")
        self.result = np.empty_like(self.current)
        self.original = np.empty_like(self.current) if chained else None

    def fits(self, bits: np.ndarray) -> bool:
        return fingerprint(bits) == self.record.fingerprint[self.record.dtype]


@dataclass
class _Plan:
    """Every edit of every tensor, by tensor name (in adapter order), and the patch that applies them."""

    edits: dict[str, list[_Edit]]

    @classmethod
    def of(cls, files: list[tuple[str, fmt.SpraFile]], scale: float) -> _Plan:
        edits: dict[str, list[_Edit]] = {}
        for path, f in files:
            for r in f.tensors:
                edits.setdefault(r.name, []).append(_Edit(path, r, scale))
        plan = cls(edits)
        plan.check_empty()
        return plan

    def check_empty(self) -> None:
        """Empty supports: their fingerprint is known without reading the base, so check it now."""
        none = np.empty(0, dtype=np.uint16)
        for name, edits in self.edits.items():
            for e in edits:
                if e.record.support.count == 0 and not e.fits(none):
                    raise MismatchError(f"tensor {name!r}: {MISMATCH}", e.path)

    def streamed(self) -> set[str]:
        """The tensors whose bytes change (an empty support changes nothing)."""
        return {n for n, edits in self.edits.items() if any(e.record.support.count for e in edits)}

    def patch(self, name: str, elements: np.ndarray, first: int) -> None:
        """Apply every edit of tensor `name` to its raw elements [first, first + len(elements)).

        Called once per chunk of a few hundred KiB: kept to a dozen numpy calls on short arrays.
        Whether the base values and results are finite is checked once per tensor, in `finish`
        (a chunk with a result that is not finite may be written; the output is then discarded)."""
        edits = self.edits[name]
        dtype, numel = edits[0].record.dtype, edits[0].record.support.numel
        if first == 0:
            for e in edits:
                e.start(elements.itemsize, len(edits) > 1)
        end = first + elements.size
        spans = []
        for e in edits:
            lo, hi = e.done, int(np.searchsorted(e.indices, end))
            local = e.indices[lo:hi] - first
            if e.original is not None:
                e.original[lo:hi] = elements[local]
            spans.append((e, lo, hi, local))
        with np.errstate(over="ignore", invalid="ignore"):
            for e, lo, hi, local in spans:
                bits = elements[local]
                e.current[lo:hi] = bits
                summed = _to_float32(bits, dtype)
                summed += e.delta[lo:hi]
                bits = _from_float32(summed, dtype)
                e.result[lo:hi] = bits
                elements[local] = bits
                e.done = hi
        if end == numel:
            self.finish(name, edits)

    def finish(self, name: str, edits: list[_Edit]) -> None:
        """The fingerprint rule of surgery.apply_adapter: each adapter fingerprints the weights it
        lands on or, in a chain of several on one tensor, the base. Base values or results that are
        not finite leave the tensor to the in-memory path."""
        for e in edits:
            if _any_not_finite(e.current, e.record.dtype) or _any_not_finite(e.result, e.record.dtype):
                raise _NotFinite
            if not e.fits(e.current) and (e.original is None or not e.fits(e.original)):
                raise MismatchError(f"tensor {name!r}: {MISMATCH}", e.path)
            del e.indices, e.delta, e.current, e.result, e.original


# The exponent bits of each float dtype: all set means Inf or NaN.
_EXPONENT = {"BF16": 0x7F80, "F16": 0x7C00, "F32": 0x7F800000}


def _any_not_finite(bits: np.ndarray, dtype: str) -> bool:
    exponent = _EXPONENT[dtype]
    return bool(((bits & exponent) == exponent).any())


def _as_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw elements of float dtype name `dtype` (any numpy view of their bits) as float32, exactly."""
    return _to_float32(raw.view(f"<u{fmt.DTYPES[dtype][0]}"), dtype)


def _to_float32(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Raw bits (unsigned, the dtype's width) as float32 (F32: the same memory)."""
    if dtype == "BF16":
        wide = bits.astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32)
    if dtype == "F16":
        return bits.view(np.float16).astype(np.float32)
    return bits.view(np.float32)


def _from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 to the raw bits of `dtype`, rounded to nearest even as torch casts: exact for finite
    inputs (the callers send Inf and NaN to the in-memory path). Reuses `x`'s memory."""
    if dtype == "BF16":
        u = x.view(np.uint32)
        odd = u >> 16
        odd &= 1
        u += odd
        u += 0x7FFF
        u >>= 16
        return u.astype(np.uint16)
    if dtype == "F16":
        return x.astype(np.float16).view(np.uint16)
    return x.view(np.uint32)
