"""One front for every kernel: support generation, gather, scatter-apply, exact restore, the
training ops (weight gradients at the support, the fused AdamW step) and the unmerged sparse
product (`sparse_addmm`: y += x · Δᵀ for many adapters in one batch).

The backend is chosen per call from ``SPRA_TOOLS_BACKEND`` (auto|reference|cpu|cuda; auto = the
fastest available for the tensor's device; the old name ``SPRA_BACKEND`` still works). Every backend gives bit-identical results; the pure-torch
`reference` backend defines them and is always available.

Scatter-apply semantics, for every backend and weight dtype (fp32 / bf16 / fp16):
``W[s] = cast_to_W(fp32(W[s]) + fp32(scale) * fp32(v))``, each operation rounded to fp32 (no
fused multiply-add), the final cast round-to-nearest-even. With scale == 1 the product is skipped.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable

import numpy as np
import torch

from ..errors import SpraError
from ..support import ExplicitSupport, SeededSupport, Support, as_int64, tensor_key
from . import extension
from .library import DEFAULTS
from .sparse import SegmentTable, SparseLayout, segment_table

BACKENDS = ("auto", "reference", "cpu", "cuda")
BACKEND_VARIABLE = "SPRA_TOOLS_BACKEND"
_OLD_BACKEND_VARIABLE = "SPRA_BACKEND"  # its name before every variable took the SPRA_TOOLS_ prefix


def compiled_backends(build: bool = False) -> dict[str, str]:
    """Status of each compiled backend: "ok" or the reason it is unavailable (builds only if asked)."""
    return {kind: extension.load(kind, build) for kind in extension.KINDS}


def backend_setting() -> tuple[str, str]:
    """(variable, choice): the backend asked for in the environment, "auto" when none is."""
    variable = BACKEND_VARIABLE
    if variable not in os.environ and _OLD_BACKEND_VARIABLE in os.environ:
        variable = _OLD_BACKEND_VARIABLE
        _warn_old_variable()
    return variable, os.environ.get(variable, "auto").strip().lower() or "auto"


@functools.cache
def _warn_old_variable() -> None:
    warnings.warn(
        f"{_OLD_BACKEND_VARIABLE} is deprecated; set {BACKEND_VARIABLE} instead", DeprecationWarning, stacklevel=4
    )


def backend_for(device: torch.device | str, build: bool = True) -> str:
    """The backend that serves tensors on `device` under the current SPRA_TOOLS_BACKEND.

    With `build`, a compiled backend not yet built is built now (once; cached)."""
    variable, choice = backend_setting()
    if choice not in BACKENDS:
        raise SpraError(f"{variable}={choice!r} is not one of {', '.join(BACKENDS)}")
    device_type = torch.device(device).type
    if choice == "auto":
        usable = device_type in extension.KINDS and extension.load(device_type, build) == "ok"
        return device_type if usable else "reference"
    if choice == "reference":
        return "reference"
    status = extension.load(choice, build)
    if status != "ok":
        raise SpraError(f"{variable}={choice} is unavailable ({status})")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SpraError(f"{variable}=cuda is unavailable (no CUDA device is visible)")
    return choice


def _op(name: str, device) -> Callable:
    """The kernel of op `name` for tensors on `device`: the reference, the compiled kernel of that
    device, or — when SPRA_TOOLS_BACKEND names another device — that device's kernel on copies."""
    backend = backend_for(device)
    if backend == "reference":
        return DEFAULTS[name]
    op = getattr(torch.ops.spra_tools, name)
    if backend == torch.device(device).type:
        return op
    return functools.partial(_run_on, op, torch.device(backend), name in _MUTATING)


_MUTATING = {
    "seeded_apply",
    "seeded_restore",
    "scatter_apply",
    "restore",
    "scatter_apply_many",
    "restore_many",
    "sparse_addmm",
}  # their first argument


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
    return as_int64(tensor_key(support.seed, support.name))


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
    _check_bounds(weight, indices)
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


def gather_many(weights: list[torch.Tensor], indices: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every weight at its indices, flat in tensor order — one launch for all tensors.

    `indices` holds each tensor's flat indices (int64, or int32 where every numel fits), the
    first counts[0] for weights[0] and so on."""
    _check_many(weights, indices, counts, None)
    return _op("gather_many", weights[0].device)(weights, indices, counts)


def scatter_apply_many(
    weights: list[torch.Tensor],
    indices: torch.Tensor,
    counts: list[int],
    values: torch.Tensor,
    scale: float = 1.0,
    save_originals: bool = True,
) -> torch.Tensor:
    """scatter_apply for many tensors in one launch (indices as in gather_many); returns the
    originals (flat, weight dtype) for an exact `restore_many`, or an empty tensor."""
    _check_many(weights, indices, counts, values)
    return _op("scatter_apply_many", weights[0].device)(weights, indices, counts, values, float(scale), save_originals)


def restore_many(
    weights: list[torch.Tensor], indices: torch.Tensor, counts: list[int], originals: torch.Tensor
) -> None:
    """In place: put back the originals returned by scatter_apply_many — bit-exact."""
    _check_many(weights, indices, counts, originals)
    if originals.dtype != weights[0].dtype:
        raise ValueError(f"restore_many needs originals in the weight dtype {weights[0].dtype}, got {originals.dtype}")
    _op("restore_many", weights[0].device)(weights, indices, counts, originals)


def _check_many(weights, indices: torch.Tensor, counts, values) -> None:
    # The weights themselves (contiguous, one dtype and device) are checked by every kernel: this
    # runs on each swap of a staged adapter, where a Python loop over hundreds of tensors would show.
    if not weights or len(counts) != len(weights):
        raise ValueError("need one count per weight, and at least one weight")
    w0 = weights[0]
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1 or indices.device != w0.device:
        raise ValueError("indices must be 1-D int32 or int64 on the weights' device")
    total = sum(counts)
    if indices.numel() != total or (
        values is not None and (values.shape != indices.shape or values.device != w0.device)
    ):
        raise ValueError(f"need sum(counts) = {total} indices and as many values on the weights' device")


def _check(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")
    if indices.dtype != torch.int64 or values.shape != indices.shape:
        raise ValueError(f"need int64 indices and values of the same length, got {indices.shape} and {values.shape}")
    _check_bounds(weight, indices)


def _check_bounds(weight: torch.Tensor, indices: torch.Tensor) -> None:
    """The compiled kernels do not check their indices (a bad one reads or writes out of bounds, or
    kills the process): every single-tensor entry checks them here, one pass over the indices."""
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
    if indices.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(indices)).tolist()  # one pass, one host sync
    if low < 0 or high >= weight.numel():
        raise ValueError(f"indices must lie in [0, {weight.numel()}) for a weight of shape {tuple(weight.shape)}")


def support_grad(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """fp32 ``g[n] = Σ_t a[t, i_n] · b[t, j_n]`` for flat support indices into a [R, C] weight
    (a [T, R], b [T, C]; for nn.Linear a = dY, b = X). Only the support is returned.

    method: "sddmm" (the sampled kernel: work ∝ support size × tokens), "dense" (``aᵀb`` by the
    BLAS in fp32, then gathered; the [R, C] product lives only inside this call), or "auto", which
    picks per call from the measured crossover (`sddmm_is_faster`) unless SPRA_TOOLS_SUPPORT_GRAD
    names a method (for benchmarks and tests)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"need a [T, R] and b [T, C], got {tuple(a.shape)} and {tuple(b.shape)}")
    b = b.to(a.dtype)
    tokens, rows, cols = a.shape[0], a.shape[1], b.shape[1]
    if method == "auto":
        method = os.environ.get("SPRA_TOOLS_SUPPORT_GRAD", "auto")
    if method == "auto":
        use_sddmm = a.device.type == "cuda" and sddmm_is_faster(indices.numel(), rows, cols, tokens)
        method = "sddmm" if use_sddmm else "dense"
    if method == "dense":
        if a.device.type == "cuda" and a.dtype != torch.float32:
            dense = torch.mm(a.t(), b, out_dtype=torch.float32)  # bf16/fp16 in, fp32 accumulated and out
        else:
            dense = torch.mm(a.t().float(), b.float())
        return dense.view(-1).index_select(0, indices)
    if method != "sddmm":
        raise ValueError(f"method must be auto, sddmm or dense, not {method!r}")
    return _op("sampled_grad", a.device)(_feature_major(a), _feature_major(b), indices)


def _feature_major(x: torch.Tensor) -> torch.Tensor:
    """x [T, F] as [F, T'] contiguous, tokens zero-padded to a multiple of 8 (16-byte rows)."""
    pad = -x.shape[0] % 8
    if pad == 0:
        return x.t().contiguous()
    out = x.new_zeros(x.shape[1], x.shape[0] + pad)
    out[:, : x.shape[0]] = x.t()
    return out


# The crossover between the two gradient methods: a cost model (nanoseconds) fitted to 26 shapes x
# densities x token counts on an H200 (`scripts/bench_support_grad.py --sweep`; docs/BENCHMARKS.md),
# which it ranks correctly in 25 (the miss is a 2 % tie). The sampled kernel pays per multiply-add of
# the support (k * T) and for making both operands feature-major ((R + C) * T); the dense product
# (cuBLAS, ~600 TFLOP/s) per multiply-add of R * C * T and per fp32 output gathered.
_SDDMM_NS = (3.3e-4, 6.7e-3, 59e3)  # per k*T, per (R+C)*T, fixed
_DENSE_NS = (2.35e-6, 1.0e-3, 48e3)  # per R*C*T, per R*C, fixed


def sddmm_is_faster(k: int, rows: int, cols: int, tokens: int) -> bool:
    """Whether the sampled kernel beats dense-then-gather for a support of k elements of [rows, cols]."""
    sddmm = _SDDMM_NS[0] * k * tokens + _SDDMM_NS[1] * (rows + cols) * tokens + _SDDMM_NS[2]
    dense = _DENSE_NS[0] * rows * cols * tokens + _DENSE_NS[1] * rows * cols + _DENSE_NS[2]
    return sddmm < dense


def adamw_step(weights, indices, originals, deltas, grads, exp_avgs, exp_avg_sqs, *, lr: float, betas, eps: float,
               weight_decay: float, step: int, grad_scale: torch.Tensor | None = None) -> None:  # fmt: skip
    """One fused AdamW step over many adapted tensors (lists, one entry per tensor), in place:
    fp32 `deltas` and moments updated, then ``W[s] = cast(W0[s] + delta)`` with W0 = `originals`.
    `grad_scale` (one fp32 value on the device, e.g. a clipping factor) multiplies every gradient.
    Tensors are grouped by device and weight dtype: one launch per group (normally one)."""
    beta1, beta2 = betas
    scalars = (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
               lr / (1.0 - beta1**step), 1.0 / math.sqrt(1.0 - beta2**step))  # fmt: skip
    groups: dict = {}
    for t, w in enumerate(weights):
        groups.setdefault((w.device, w.dtype), []).append(t)
    lists = (weights, indices, originals, deltas, grads, exp_avgs, exp_avg_sqs)
    for (device, _), members in groups.items():
        picked = [[xs[t] for t in members] for xs in lists]
        _op("adamw_step", device)(*picked, *scalars, grad_scale)


def sparse_addmm(out: torch.Tensor, x: torch.Tensor, values: torch.Tensor, block_ptrs: torch.Tensor,
                 segments: SegmentTable, offsets: torch.Tensor | None = None, keys: torch.Tensor | None = None,
                 transposed: bool = False) -> None:  # fmt: skip
    """In place, the unmerged sparse product for the rows of each segment: ``out[t] += x[t] · Mᵀ``
    (transposed: ``x[t] · M``) with M the segment's slot's sparse matrix, accumulated in fp32 and
    added once, ``cast(out + acc)``; rows of no segment (and outputs whose sum is exactly 0) stay as
    they are, bit for bit. nn.Linear's forward is the plain product of its Δ; GPT-2 Conv1D's, and any
    input gradient ``g · Δ``, the transposed one. out [T, P] row-major and x [T, Q] share a float
    dtype; values (bf16/fp16/fp32) with `offsets` (block layout, ops.sparse) or, without them, seeded
    supports regenerated in the kernel from `keys`. Contract: ops.reference.sparse_addmm."""
    if out.dim() != 2 or x.dim() != 2 or out.shape[0] != x.shape[0] or out.stride(1) != 1:
        raise ValueError(f"need a row-major out [T, P] and x [T, Q], got {tuple(out.shape)} and {tuple(x.shape)}")
    if offsets is None and keys is None:
        raise ValueError("need the support's offsets or its seeded keys")
    if out.device.type == "cuda" and segments.max_rows >= 8 and x.stride(1) == 1:
        x = x.t().contiguous().t()  # feature-major: a warp's tokens then read one column in one transaction
    empty = out.new_empty(0, dtype=torch.int64)
    _op("sparse_addmm", out.device)(
        out, x, values, block_ptrs, offsets if offsets is not None else empty.short(),
        keys if keys is not None else empty, segments.tensor, segments.max_rows, transposed,
    )  # fmt: skip


def sparse_addmm_kernel(device: torch.device | str) -> Callable:
    """The kernel behind sparse_addmm for tensors on `device`, resolved once, taking the op's own
    arguments (out, x, values, block_ptrs, offsets, keys, segments tensor, max_rows, transposed;
    empty offsets or keys for the unused one): for callers that run it hundreds of times a step."""
    return _op("sparse_addmm", device)


@functools.lru_cache(maxsize=64)
def _all_rows(rows: int, device: torch.device) -> SegmentTable:
    return segment_table([(0, rows, 0)], device)


def sparse_linear_add(out: torch.Tensor, x: torch.Tensor, layout: SparseLayout, values: torch.Tensor,
                      transposed: bool = False) -> None:  # fmt: skip
    """``out += x · Mᵀ`` (transposed: ``x · M``) on every row, M the layout's matrix with `values`
    (in support order; a layout built transposed takes them through its `order`). With the layout
    of an nn.Linear's Δ [out, in]: ``y += x · Δᵀ``, and transposed, the input gradient ``g · Δ``."""
    if layout.order is not None:
        values = values[layout.order]
    sparse_addmm(out, x, values, layout.block_ptrs, _all_rows(out.shape[0], out.device),
                 layout.offsets if layout.offsets.numel() else None,
                 layout.keys if layout.keys.numel() else None, transposed)  # fmt: skip


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


def adamw_step_deltas(deltas, grads, exp_avgs, exp_avg_sqs, *, lr: float, betas, eps: float, weight_decay: float,
                      step: int, grad_scale: torch.Tensor | None = None) -> None:  # fmt: skip
    """`adamw_step` for deltas with no weight to write (unmerged layers: a quantized base keeps its
    weights), in place: torch's multi-tensor fused AdamW, one launch per device — the same math as
    ``reference.adamw_update`` up to fp32 rounding. `grad_scale` multiplies every gradient."""
    groups: dict = {}
    for t, d in enumerate(deltas):
        groups.setdefault(d.device, []).append(t)
    for device, members in groups.items():
        steps = [torch.tensor(float(step), device=device)] * len(members)  # read, not written
        inverse = None if grad_scale is None else (1.0 / grad_scale.float()).to(device)  # torch divides by it
        torch._fused_adamw_(
            [deltas[t] for t in members], [grads[t] for t in members], [exp_avgs[t] for t in members],
            [exp_avg_sqs[t] for t in members], [], steps, lr=float(lr), beta1=float(betas[0]), beta2=float(betas[1]),
            weight_decay=float(weight_decay), eps=float(eps), amsgrad=False, maximize=False, grad_scale=inverse,
        )  # fmt: skip
