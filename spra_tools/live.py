"""Adapters on a loaded model: attach, detach and swap in place, bit-exactly, on any device.

    h = spra_tools.attach(model, "task.spra")      # verify fingerprints, apply in place
    h.detach()                                     # the base weights, bit for bit
    with spra_tools.attached(model, "task.spra"): ...
    h = spra_tools.swap(h, "other.spra")

    staged = spra_tools.stage(model, "b.spra")     # verify once, keep it on the device
    h = spra_tools.swap(h, staged)                 # then swaps do no verification, no host transfer

Attach groups the adapter's tensors by (device, weight dtype, values dtype) and applies each
group in one kernel launch (seeded supports are regenerated on the device, never stored), keeping
the overwritten originals for an exact restore. Models split over devices (`device_map`) simply
give several groups. Tied weights are one parameter under two names: it is adapted once.
Explicit supports (from diff, merge, convert) are applied the same way, one launch per group,
from their indices copied to the device once per attach.

On a quantized model (bitsandbytes, torchao) the quantized layers cannot change in place: attach
adds the adapter's sparse term to their outputs instead, ``y = base(x) + x · Δᵀ``, after verifying it
against the full-precision checkpoint the model was loaded from (spra_tools.quantized); detach
takes the term off. Other layers of the model take the adapter in place as usual.

A staged adapter has been verified against the model's base when staged and holds, on the
model's devices, its values and its supports' indices (int32 offsets; int64 for a tensor of more
than 2**31 elements): 6 bytes per bf16 value (42 MB for an all-linear 0.1 % adapter of an 8B
model), plus its dense tensors. Attaching or swapping it in verifies nothing and copies nothing
from the host; attaching adds, as for any adapter, the originals (one weight-dtype value each).
The verification holds for the base as it was when staged: weights changed by other means
afterwards are not checked again.

Several adapters may be attached at once; they act in attach order. Detaching any of them
restores the adapters attached after it, restores it, and re-applies the later ones in order, so
the model always equals "base + the remaining adapters applied in attach order", bit for bit,
whatever the detach order. An adapter is accepted, tensor by tensor, when its fingerprints match
the weights it lands on (the base plus the adapters attached before it: a chain trained on
base + A) or, failing that, the base itself (adapters trained side by side on the base, whose
supports may overlap); for the base, the saved originals of the attached adapters stand in where
they changed an element. `apply BASE A B` follows the same rule (docs/FORMAT.md §6).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace

import torch

from . import ops, quantized
from .adapter import Adapter
from .errors import MismatchError, SpraError
from .fingerprint import mismatches
from .names import NameMap
from .support import SeededSupport


@dataclass
class _Group:
    """Tensors of one device, weight dtype and values dtype, applied together."""

    names: list[str]
    params: list[torch.nn.Parameter]
    weights: list[torch.Tensor]  # the parameters' data
    supports: list
    values: torch.Tensor  # flat, on the group's device
    counts: list[int] = field(default_factory=list)  # support elements per tensor
    indices: torch.Tensor | None = None  # flat per-tensor offsets on the device; None: regenerated from seeds
    originals: torch.Tensor | None = None  # flat, set while attached


@dataclass(eq=False)  # a handle is itself: equal field values (a tensor among them) say nothing
class Handle:
    """An adapter attached to a model; `detach()` puts the model back exactly."""

    model: torch.nn.Module
    adapter: Adapter
    scale: float
    groups: list[_Group]
    dense: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # param, new value
    _dense_originals: dict[str, torch.Tensor] = field(default_factory=dict)
    attached: bool = False
    unmerged: list = field(default_factory=list)  # (quantized.UnmergedLayer, values): sparse terms

    def __repr__(self) -> str:  # the dataclass's would print the whole model
        state = "attached" if self.attached else "detached"
        return f"Handle({_summary(self.adapter)}, scale={self.scale:g}, {state})"

    def detach(self) -> None:
        """Remove this adapter; later-attached adapters are re-applied on top (module docstring)."""
        stack = _stack(self.model)
        if not self.attached or self not in stack:
            raise SpraError("this adapter is not attached")
        _beneath(stack[stack.index(self) + 1 :], self._restore)
        stack.remove(self)

    def _apply(self) -> None:
        with torch.no_grad():
            for g in self.groups:
                if g.indices is None:
                    g.originals = ops.apply_seeded(g.weights, g.supports, g.values, self.scale)
                else:
                    g.originals = ops.scatter_apply_many(g.weights, g.indices, g.counts, g.values, self.scale)
            for name, (param, value) in self.dense.items():
                self._dense_originals[name] = param.detach().clone()
                param.data.copy_(value)
        for layer, values in self.unmerged:
            layer.patch(lambda values=values: values)
        self.attached = True

    def _restore(self) -> None:
        with torch.no_grad():
            for g in self.groups:
                if g.indices is None:
                    ops.restore_seeded(g.weights, g.supports, g.originals)
                else:
                    ops.restore_many(g.weights, g.indices, g.counts, g.originals)
                g.originals = None
            for name, (param, _) in self.dense.items():
                param.data.copy_(self._dense_originals.pop(name))
        for layer, _ in reversed(self.unmerged):
            layer.unpatch()
        self.attached = False


@dataclass(eq=False)
class Staged:
    """An adapter verified against a model's base and resident on its devices (module docstring):
    `attach(model, staged)` and `swap(handle, staged)` apply it without verification or host copies."""

    model: torch.nn.Module
    adapter: Adapter
    groups: list[_Group]
    dense: dict[str, tuple[torch.Tensor, torch.Tensor]]
    unmerged: list = field(default_factory=list)

    def __repr__(self) -> str:  # the dataclass's would print the whole model
        devices = ", ".join(sorted({str(g.values.device) for g in self.groups})) or "no device"
        return f"Staged({_summary(self.adapter)}, {self.nbytes:,} bytes on {devices})"

    @property
    def nbytes(self) -> int:
        """Device memory it holds: values, indices and dense tensors."""
        held = sum(g.values.nbytes + g.indices.nbytes for g in self.groups)
        held += sum(v.nbytes + layer.indices.nbytes + layer.layout.offsets.nbytes for layer, v in self.unmerged)
        return held + sum(value.nbytes for _, value in self.dense.values())

    def _handle(self, model: torch.nn.Module, scale: float) -> Handle:
        if model is not self.model:
            raise SpraError("this adapter was staged on another model")
        if any(g.params[0].data_ptr() != g.weights[0].data_ptr() for g in self.groups):
            raise SpraError("the model's weights moved since this adapter was staged (e.g. .to()); stage it again")
        unmerged = [
            (replace(layer, own_forward=None, patched=False), v if scale == 1.0 else v.float() * scale)
            for layer, v in self.unmerged
        ]
        groups = [replace(g, originals=None) for g in self.groups]
        return Handle(model, self.adapter, scale, groups, self.dense, unmerged=unmerged)


def _summary(adapter: Adapter) -> str:
    dense = f", {len(adapter.dense)} dense" if adapter.dense else ""
    return f"{len(adapter.deltas)} tensors, {adapter.num_values:,} values{dense}"


def _stack(model: torch.nn.Module) -> list[Handle]:
    if not hasattr(model, "_spra_handles"):
        model._spra_handles = []
    return model._spra_handles


def as_adapter(adapter_or_path) -> Adapter:
    """An Adapter as given, or read from a path (NaN/Inf values refused: they would reach the weights)."""
    if isinstance(adapter_or_path, Adapter):
        return adapter_or_path
    if isinstance(adapter_or_path, (str, os.PathLike)):
        return Adapter.load(adapter_or_path, allow_nonfinite=False)
    raise TypeError(f"expected an Adapter or a path, got {type(adapter_or_path).__name__}")


def prepare(model: torch.nn.Module, adapter: Adapter, scale: float, where) -> Handle:
    """A detached handle of `adapter` on `model`: parameters resolved, fingerprints verified against
    the base values (MismatchError naming `where` otherwise), values on the weights' devices.

    The adapter's tensors are checkpoint names; each resolves to the parameter transformers loads it
    into (`spra_tools.names`: a task class over a bare base, a bare class over a task checkpoint,
    renames on load)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    names = NameMap(model, [*adapter.deltas, *adapter.dense])
    groups: dict[tuple, _Group] = {}
    seen: set[int] = set()
    layers = quantized.quantized_layers(model)
    for name, delta in adapter.deltas.items():
        if name in layers:  # a sparse term beside the quantized weight, not in it
            continue
        param = params.get(names.model_name(name) or name)
        if param is None:
            raise MismatchError(f"tensor {name!r}: not a parameter of this model; is this the adapter's base?", where)
        if id(param) in seen:  # a tied weight already adapted under its other name
            continue
        seen.add(id(param))
        w = param.data
        if tuple(w.shape) != delta.shape or not w.is_contiguous():
            raise MismatchError(
                f"tensor {name!r}: shape {tuple(w.shape)} in the model, {delta.shape} in the adapter", where
            )
        seeded = isinstance(delta.support, SeededSupport)
        key = (w.device, w.dtype, delta.values.dtype, seeded)
        g = groups.setdefault(key, _Group([], [], [], [], torch.empty(0)))
        g.names.append(name)
        g.params.append(param)
        g.weights.append(w)
        g.supports.append(delta.support)
        g.counts.append(delta.support.count)
    dense = {}
    for name, value in adapter.dense.items():
        param = params.get(names.model_name(name) or name)
        if param is None or tuple(param.shape) != tuple(value.shape):
            raise MismatchError(f"dense tensor {name!r}: no parameter of that name and shape in the model", where)
        dense[name] = (param, value.to(param.device, param.dtype))
    for (device, _, _, seeded), g in groups.items():
        g.values = torch.cat([adapter.deltas[n].values for n in g.names]).to(device)
        if not seeded:
            g.indices = _offsets(g.supports, device)
        _verify(model, adapter, g, where)
    unmerged = quantized.prepare_unmerged(
        model, adapter, [n for n in adapter.deltas if n in layers], scale, layers, where
    )
    return Handle(model, adapter, scale, list(groups.values()), dense, unmerged=unmerged)


def _verify(model: torch.nn.Module, adapter: Adapter, g: _Group, where) -> None:
    """Fingerprints of the group, in one pass: per tensor, of the weights it lands on, or else of
    the base (module docstring)."""
    if g.indices is None:
        values = ops.gather_seeded(g.weights, g.supports)
    else:
        values = ops.gather_many(g.weights, g.indices, g.counts)
    recorded = [adapter.deltas[n].fingerprint for n in g.names]
    counts = [s.count for s in g.supports]
    refused = mismatches(values, counts, recorded)
    if any(refused) and _stack(model):
        of_base = mismatches(_base_values(model, g, values), counts, recorded)
        refused = [a and b for a, b in zip(refused, of_base)]
    for name, differs in zip(g.names, refused):
        if differs:
            raise MismatchError(
                f"tensor {name!r}: values at the support differ from the adapter's base (fingerprint mismatch: wrong base?)",
                where,
            )


def _offsets(supports: list, device) -> torch.Tensor:
    """The supports' flat indices, concatenated on `device`: int32 (half the memory) where every
    tensor has at most 2**31 elements."""
    idx = ops.indices_many(supports, device)
    return idx.to(torch.int32) if all(s.numel <= 1 << 31 for s in supports) else idx


def _addresses(g: _Group, device) -> torch.Tensor:
    """Memory address of every support element: identifies an element across tensors and names."""
    idx = ops.indices_many(g.supports, device) if g.indices is None else g.indices.to(device, torch.int64)
    ptrs = torch.tensor([w.data_ptr() for w in g.weights], dtype=torch.int64, device=device)
    counts = torch.tensor(g.counts, dtype=torch.int64, device=device)
    return torch.repeat_interleave(ptrs, counts, output_size=idx.numel()) + idx * g.weights[0].element_size()


def _base_values(model, g: _Group, values: torch.Tensor) -> torch.Tensor:
    """`values` (the group's weights at its supports) with elements that attached adapters changed put
    back to the base: the earliest such adapter's saved original is the base value."""
    device = values.device
    mine = _addresses(g, device)
    ours = {w.data_ptr() for w in g.weights}
    values = values.clone()
    restored = torch.zeros(values.numel(), dtype=torch.bool, device=device)
    for h in _stack(model):  # earliest first
        for other in h.groups:
            if (
                other.originals is None
                or not ours & {w.data_ptr() for w in other.weights}
                or not other.originals.numel()
            ):
                continue
            theirs = _addresses(other, device)
            order = torch.argsort(theirs)
            sorted_theirs = theirs[order]
            pos = torch.searchsorted(sorted_theirs, mine).clamp_(max=sorted_theirs.numel() - 1)
            hit = (sorted_theirs[pos] == mine) & ~restored
            values[hit] = other.originals[order[pos[hit]]].to(values.dtype)
            restored |= hit
    return values


def stage(model: torch.nn.Module, adapter_or_path) -> Staged:
    """Verify an adapter against `model`'s base and keep it on the model's devices, ready to attach
    or swap in without verification or host transfers (memory: module docstring).

    A wrong base is refused (MismatchError) here; staging never changes the model.
    """
    adapter = as_adapter(adapter_or_path)
    where = adapter_or_path if not isinstance(adapter_or_path, Adapter) else None
    prepared = prepare(model, adapter, 1.0, where)
    for g in prepared.groups:
        if g.indices is None:
            g.indices = _offsets(g.supports, g.values.device)
    return Staged(model, adapter, prepared.groups, prepared.dense, prepared.unmerged)


def _handle_for(model: torch.nn.Module, adapter_or_path, scale: float) -> Handle:
    """A handle ready to apply: a staged adapter as it is, anything else loaded and verified."""
    if isinstance(adapter_or_path, Staged):
        return adapter_or_path._handle(model, scale)
    adapter = as_adapter(adapter_or_path)
    where = adapter_or_path if not isinstance(adapter_or_path, Adapter) else None
    return prepare(model, adapter, scale, where)


def attach(model: torch.nn.Module, adapter_or_path, scale: float = 1.0) -> Handle:
    """Verify `adapter` (an Adapter, a path, or a Staged one: verified already) against `model`'s
    weights, apply it in place, and return its handle.

    A wrong base is refused (MismatchError) before any weight changes.
    """
    handle = _handle_for(model, adapter_or_path, float(scale))
    handle._apply()
    _stack(model).append(handle)
    return handle


def swap(handle: Handle, adapter_or_path, scale: float | None = None) -> Handle:
    """Replace an attached adapter by another, verified against the weights it lands on (those
    without `handle`) or the base (a Staged one was verified when staged); refused, the model is
    as before, bit for bit, with `handle` still attached in its place."""
    model = handle.model
    stack = _stack(model)
    if not handle.attached or handle not in stack:
        raise SpraError("this adapter is not attached")
    position = stack.index(handle)
    handle.detach()
    try:
        new = _handle_for(model, adapter_or_path, float(handle.scale if scale is None else scale))
    except BaseException:
        _reattach(handle, position)
        raise
    new._apply()
    stack.append(new)
    return new


def _reattach(handle: Handle, position: int) -> None:
    """Undo `handle.detach()`: it goes back to `position` in the attach order (the later adapters
    are restored, it is applied, they are re-applied: the weights of before, bit for bit)."""
    stack = _stack(handle.model)
    _beneath(stack[position:], handle._apply)
    stack.insert(position, handle)


def _beneath(later: list[Handle], change) -> None:
    """`change()` under the adapters `later` (attached after the one it changes): they come off in
    reverse order and go back on in order, so the weights stay base + the attach order, bit for bit."""
    for h in reversed(later):
        h._restore()
    change()
    for h in later:
        h._apply()


@contextlib.contextmanager
def attached(model: torch.nn.Module, adapter_or_path, scale: float = 1.0):
    """Attach for the duration of a `with` block; detach (exactly) on the way out, errors included."""
    handle = attach(model, adapter_or_path, scale)
    try:
        yield handle
    finally:
        if handle.attached:
            handle.detach()


def load_model(base: str | os.PathLike, adapter_or_path, scale: float = 1.0, **from_pretrained_kwargs):
    """Load `base` with transformers and attach the adapter: the model a transformers user expects.

    The Auto class follows the adapter's task (`task.type == "seq-cls"` -> sequence classification,
    with its labels; otherwise causal LM). The handle is kept as `model.spra_handle`.
    """
    import transformers

    adapter = as_adapter(adapter_or_path)
    task = adapter.task or {}
    if task.get("type") == "seq-cls":
        labels = task.get("id2label") or {}
        if labels:
            from_pretrained_kwargs.setdefault("id2label", {int(k): v for k, v in labels.items()})
            from_pretrained_kwargs.setdefault("label2id", {v: int(k) for k, v in labels.items()})
        auto = transformers.AutoModelForSequenceClassification
    else:
        auto = transformers.AutoModelForCausalLM
    model = auto.from_pretrained(base, **from_pretrained_kwargs)
    model.spra_handle = attach(model, adapter, scale)
    return model
