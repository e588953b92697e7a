"""Quantized bases (bitsandbytes 4-/8-bit, torchao weight-only): sparse deltas kept beside the weights.

A quantized weight cannot take a small delta in place, so an adapted quantized layer runs its own
forward and adds the unmerged sparse term, ``y = base(x) + x · Δᵀ`` (ops.sparse_linear_add, the
primitive MultiAdapter serves with). Backward returns the input gradient through both terms (the
layer's own backward, plus ``g · Δ`` by the transposed product) and Δ's gradient only at the
support (ops.support_grad: sampled or dense-then-gathered, as for in-place layers). The two
products of the sparse term run by the sparse kernel (work ∝ support × tokens) or, with
``SPRA_TOOLS_UNMERGED_PRODUCT=dense`` (for benchmarks and tests), as a dense GEMM over Δ scattered
into a transient [out, in] matrix in the activations' dtype.

Base identity. An adapter made on, or attached to, a quantized model describes the full-precision
checkpoint the model was quantized from: names, shapes and dtypes of its unquantized tensors, and
fingerprints of the checkpoint's own values at the support, read from its files (quantized values
identify nothing: they change with the quantization settings). So `verify` / `apply` against that
checkpoint work as for any adapter, and on a quantized model the checkpoint is found from where the
model was loaded (``model.config.name_or_path``, or `base` given explicitly). The quantized weights must
also agree with the checkpoint at the support within quantization error (`MAX_RELATIVE_ERROR`): a
model quantized from another base is refused even when the checkpoint named is the right one.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import ops
from .adapter import TensorDelta
from .checkpoint import Checkpoint, open_checkpoint
from .dtypes import TORCH_DTYPES
from .errors import MismatchError, SpraError
from .fingerprint import fingerprints, mismatches
from .ops.sparse import SparseLayout
from .support import Support

PRODUCTS = ("sparse", "dense")
PRODUCT_VARIABLE = "SPRA_TOOLS_UNMERGED_PRODUCT"

# NF4 / FP4 of Gaussian weights err by ~10 % / ~15 % (relative L2), int8 by ~1 %; a quantization of
# unrelated weights by ~140 %.
MAX_RELATIVE_ERROR = 0.5


@dataclass(frozen=True)
class QuantizedKind:
    """A kind of quantized linear layer: how to recognise it and how to read its weight back."""

    name: str
    matches: Callable[[nn.Module], bool]
    dequantize: Callable[[nn.Module], torch.Tensor]  # -> [out, in] float


def _bnb_4bit(module: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as F

    data, state = module.weight.data, module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # repacked for the CPU kernel by an inference call
        data, state = F._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))  # it edits the state
    return F.dequantize_4bit(data, state)


def _bnb_8bit(module: nn.Module) -> torch.Tensor:
    # Row-wise absmax int8 (LLM.int8 without outliers kept apart): W ≈ CB * SCB / 127 per row.
    cb = module.weight.data if module.weight.dtype == torch.int8 else module.state.CB
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = module.state.SCB
    return cb.float() * (scb.float().unsqueeze(1) / 127.0)


def _class_names(module: nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


KINDS = (
    QuantizedKind("bitsandbytes-4bit", lambda m: "Linear4bit" in _class_names(m), _bnb_4bit),
    QuantizedKind("bitsandbytes-8bit", lambda m: "Linear8bitLt" in _class_names(m), _bnb_8bit),
    QuantizedKind(
        "torchao",
        lambda m: isinstance(m, nn.Linear) and type(m.weight).__module__.split(".")[0] == "torchao",
        lambda m: m.weight.dequantize(),
    ),
)


def kind_of(module: nn.Module) -> QuantizedKind | None:
    """The quantized kind of a linear layer, or None for an ordinary one."""
    return next((k for k in KINDS if k.matches(module)), None)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Weight name -> quantized linear layer, for every quantized layer of `model`."""
    return {f"{n}.weight" if n else "weight": m for n, m in model.named_modules() if kind_of(m) is not None}


def logical_shape(module: nn.Module) -> tuple[int, int]:
    """The [out, in] shape of the full-precision weight behind a quantized layer."""
    return (module.out_features, module.in_features)


def dequantized(module: nn.Module) -> torch.Tensor:
    """The layer's weight as its quantization gives it back, fp32 [out, in]."""
    return kind_of(module).dequantize(module).float().reshape(logical_shape(module))


# How `spra-tools train --quantize NAME` loads its base (TrainConfig.quantize lists the names).
BNB_SETTINGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


def bnb_config(name: str, compute_dtype: torch.dtype):
    """The transformers BitsAndBytesConfig of quantization `name`, computing in `compute_dtype`."""
    try:
        import bitsandbytes  # noqa: F401
        import transformers
    except ImportError:
        raise SpraError("--quantize needs bitsandbytes: pip install 'spra-tools[quant]'") from None
    settings = dict(BNB_SETTINGS[name])
    if settings.get("load_in_4bit"):
        settings["bnb_4bit_compute_dtype"] = compute_dtype
    return transformers.BitsAndBytesConfig(**settings)


def quantization_record(model: nn.Module) -> dict | None:
    """What an adapter's provenance says of the quantization its base was loaded with (JSON-safe)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    as_dict = config if isinstance(config, dict) else config.to_dict()
    return json.loads(json.dumps(as_dict, default=str))


def open_base(model: nn.Module, base: str | os.PathLike | Checkpoint | None) -> Checkpoint:
    """The full-precision checkpoint of a quantized model: `base`, or where the model was loaded from."""
    if isinstance(base, Checkpoint):
        return base
    spec = base if base is not None else getattr(getattr(model, "config", None), "name_or_path", None)
    if not spec:
        raise SpraError(
            "a quantized model's adapter is fingerprinted against its full-precision checkpoint, and this model "
            "does not say where it was loaded from: pass the checkpoint as base="
        )
    try:
        return open_checkpoint(spec)
    except SpraError as e:
        raise SpraError(f"the full-precision checkpoint of this quantized model: {e}") from None


def base_values(ckpt: Checkpoint, name: str, module: nn.Module, indices: torch.Tensor, where=None) -> torch.Tensor:
    """The checkpoint's values of the weight `name` at the support (its own dtype, on the CPU), after
    checking that the checkpoint holds it in the layer's [out, in] shape."""
    shape = logical_shape(module)
    if name not in ckpt:
        raise MismatchError(f"tensor {name!r}: not in the checkpoint {ckpt.name}; is this the model's base?", where)
    info = ckpt.info(name)
    if tuple(info.shape) != shape or info.dtype not in TORCH_DTYPES or not TORCH_DTYPES[info.dtype].is_floating_point:
        raise MismatchError(
            f"tensor {name!r}: {info.dtype} {list(info.shape)} in the checkpoint {ckpt.name}, "
            f"a layer of shape {list(shape)} in the model",
            where,
        )
    return ckpt.view(name).reshape(-1).index_select(0, indices.cpu())


def check_quantized_from(module: nn.Module, name: str, values: torch.Tensor, indices: torch.Tensor, where=None):
    """Refuse a layer whose quantized weight is not a quantization of the checkpoint `values` at the
    support (module docstring)."""
    got = dequantized(module).reshape(-1).index_select(0, indices.to(module.weight.device)).cpu()
    want = values.float()
    error = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp(min=1e-30))
    if error > MAX_RELATIVE_ERROR:
        raise MismatchError(
            f"tensor {name!r}: the quantized weights differ from the checkpoint's by {error:.0%} at the support "
            "(is the model quantized from this checkpoint?)",
            where,
        )


def product_setting() -> str:
    """How the sparse term's products run: SPRA_TOOLS_UNMERGED_PRODUCT, "sparse" when unset."""
    value = os.environ.get(PRODUCT_VARIABLE, "sparse").strip().lower() or "sparse"
    if value not in PRODUCTS:
        raise SpraError(f"{PRODUCT_VARIABLE}={value!r} is not one of {', '.join(PRODUCTS)}")
    return value


def _dense(values: torch.Tensor, indices: torch.Tensor, layout: SparseLayout, dtype: torch.dtype) -> torch.Tensor:
    """Δ as a dense [P, Q] matrix in `dtype`."""
    dense = torch.zeros(layout.rows * layout.cols, dtype=dtype, device=values.device)
    return dense.index_copy_(0, indices, values.to(dtype)).view(layout.rows, layout.cols)


class _SparseTerm(torch.autograd.Function):
    """In place on the base layer's output y [T, P]: ``y += x · Δᵀ`` (x [T, Q]; Δ [P, Q] sparse, its
    values in support order). Backward: g passes on to y's producer; x gets ``g · Δ``; Δ gets the
    support gradient (fp32)."""

    @staticmethod
    def forward(ctx, y, x, values, layout, indices, product):
        if product == "dense":
            y.addmm_(x, _dense(values, indices, layout, y.dtype).t())
        else:
            ops.sparse_linear_add(y, x, layout, values)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, values, indices)
        ctx.layout, ctx.product = layout, product
        return y

    @staticmethod
    def backward(ctx, g):
        x, values, indices = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[1]:
            if ctx.product == "dense":
                grad_x = g @ _dense(values, indices, ctx.layout, g.dtype)
            else:
                grad_x = torch.zeros(x.shape, dtype=g.dtype, device=g.device)
                ops.sparse_linear_add(grad_x, g.contiguous(), ctx.layout, values, transposed=True)
        if ctx.needs_input_grad[2]:
            grad_values = ops.support_grad(g, x, indices)
        return g, grad_x, grad_values, None, None, None


@dataclass
class UnmergedLayer:
    """A sparse term on one quantized layer: `patch` adds it to the layer's output, `unpatch` takes it
    off. Terms of several adapters stack (each wraps the forward before it); they come off in reverse."""

    name: str
    module: nn.Module
    indices: torch.Tensor  # sorted flat int64 into [out, in], on the layer's device
    layout: SparseLayout
    own_forward: object = None  # the module's instance-level forward before ours, if any
    patched: bool = False

    @classmethod
    def of(cls, name: str, module: nn.Module, indices: torch.Tensor) -> UnmergedLayer:
        rows, cols = logical_shape(module)
        return cls(name, module, indices, SparseLayout.from_indices(indices, rows, cols))

    def patch(self, values: Callable[[], torch.Tensor]) -> None:
        """From now on ``y = base(x) + x · Δᵀ`` with Δ's values ``values()`` (fp32 master deltas in
        training, or an adapter's values), read at every call."""
        if self.patched:
            raise SpraError(f"layer {self.name!r} already carries this sparse term")
        self.own_forward = self.module.__dict__.get("forward")
        base, layout, indices, product = self.module.forward, self.layout, self.indices, product_setting()

        def forward(x, *args, **kwargs):
            y = base(x, *args, **kwargs)
            if y._is_view() or not y.is_contiguous():  # e.g. bitsandbytes int8: a view autograd cannot rebase
                y = y.contiguous() if not y.is_contiguous() else y.clone()
            shape = y.shape
            y2 = y.view(-1, shape[-1])  # [T, out]
            x2 = x.reshape(-1, x.shape[-1]).to(y.dtype)  # [T, in]
            return _SparseTerm.apply(y2, x2, values(), layout, indices, product).view(shape)

        self.module.forward = forward
        self.patched = True

    def unpatch(self) -> None:
        if not self.patched:
            return
        if self.own_forward is None:
            del self.module.forward
        else:
            self.module.forward = self.own_forward
        self.patched = False


@dataclass
class UnmergedDelta:
    """A quantized layer trained through its sparse term, and what its adapter entry records of the
    full-precision checkpoint (module docstring): dtype and fingerprints of the checkpoint's values."""

    layer: UnmergedLayer
    support: Support
    checkpoint: Checkpoint
    dtype: torch.dtype
    fingerprint: dict[str, str]

    @classmethod
    def of(cls, name: str, module: nn.Module, support: Support, base, model: nn.Module) -> UnmergedDelta:
        """The layer whose weight is checkpoint tensor `name`, at `support`; its base read from `base`
        (a Checkpoint, a path, or None: where the model was loaded from)."""
        ckpt = open_base(model, base)
        indices = ops.support_indices(support, module.weight.device)
        values = base_values(ckpt, name, module, indices)
        check_quantized_from(module, name, values, indices)
        return cls(UnmergedLayer.of(name, module, indices), support, ckpt, values.dtype, fingerprints(values))

    def delta(self, values: torch.Tensor) -> TensorDelta:
        """The adapter entry of this layer with `values` (in support order)."""
        shape = logical_shape(self.layer.module)
        return TensorDelta(self.layer.name, shape, self.dtype, self.support, values, self.fingerprint)


def prepare_unmerged(model: nn.Module, adapter, names: list[str], scale: float, layers: dict[str, nn.Module],
                     where=None) -> list[tuple[UnmergedLayer, torch.Tensor]]:  # fmt: skip
    """The sparse terms of `adapter`'s tensors `names` (weights of the quantized `layers` of `model`),
    each with its values (times `scale`) on its layer's device, verified first against the model's
    full-precision checkpoint (MismatchError naming `where` for a wrong base; module docstring)."""
    if not names:
        return []
    ckpt = open_base(model, None)
    terms = []
    for name in names:
        delta, module = adapter.deltas[name], layers[name]
        if delta.shape != logical_shape(module):
            raise MismatchError(
                f"tensor {name!r}: shape {list(logical_shape(module))} in the model, {list(delta.shape)} in the adapter",
                where,
            )
        device = module.weight.device
        indices = ops.support_indices(delta.support, device)
        values = base_values(ckpt, name, module, indices, where)
        if mismatches(values, [delta.count], [delta.fingerprint])[0]:
            raise MismatchError(
                f"tensor {name!r}: values of the checkpoint {ckpt.name} at the support differ from the adapter's "
                "base (fingerprint mismatch: wrong base?)",
                where,
            )
        check_quantized_from(module, name, values, indices, where)
        v = delta.values.to(device)
        terms.append((UnmergedLayer.of(name, module, indices), v if scale == 1.0 else v.float() * scale))
    return terms
