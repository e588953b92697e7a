"""SparseModel: a transformers model made SpaRTA-trainable, with weight gradients only at the support.

    sm = SparseModel(model, density=0.01, seed=0, targets=["vo"])
    opt = SparseAdamW(sm, lr=1e-3)          # fused: updates the deltas and writes the weights
    loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
    sm.save("task.spra")

The forward pass is the untouched model: adapted weights hold ``cast(W0 + Δ)`` in place. Each
adapted `nn.Linear`, GPT-2 `Conv1D` or `nn.Embedding` runs through a custom autograd function that
returns the input gradient as usual and, for the weight, only the gradient at the support — by the
sampled (SDDMM) kernel or by a dense product gathered at once, whichever the measured crossover
says is faster for that layer (`ops.support_grad`); no dense weight gradient outlives its layer's
backward. `.parameters()` yields only the fp32 master deltas, so any optimizer works (call `sync()`
after its step to write the weights); `SparseAdamW` does both in one fused launch.

Quantized layers (bitsandbytes, torchao) cannot hold ``W0 + Δ``: they add the unmerged sparse term
``x · Δᵀ`` to their own output instead, and nothing is written back (spra_tools.quantized).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import ops, quantized
from ..adapter import Adapter, TensorDelta
from ..checkpoint import Checkpoint, open_checkpoint
from ..dtypes import TORCH_DTYPES, dtype_name
from ..errors import SpraError
from ..fingerprint import fingerprints
from ..names import NameMap
from ..support import SeededSupport
from ..targets import select


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a linear layer in (x's own dtype when autocast is off)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _SupportLinear(torch.autograd.Function):
    """y = x Wᵀ + b for nn.Linear (W [out, in]); Conv1D (W [in, out], y = x W + b) passes transposed=True."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, indices, transposed):
        dtype = _compute_dtype(x)
        x, weight = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x, weight, indices)
        ctx.transposed = transposed
        w = weight.t() if transposed else weight
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, indices = ctx.saved_tensors
        w = weight.t() if ctx.transposed else weight  # [out, in]
        grad_x = grad_y @ w.to(grad_y.dtype) if ctx.needs_input_grad[0] else None
        dy, x2 = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1])  # [T, out], [T, in]
        grad_delta = ops.support_grad(x2, dy, indices) if ctx.transposed else ops.support_grad(dy, x2, indices)
        grad_bias = dy.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_delta, None, None


class _SupportEmbedding(torch.autograd.Function):
    """y = W[ids] for nn.Embedding (W [vocab, hidden]); the weight gradient only at the support."""

    @staticmethod
    def forward(ctx, ids, weight, delta, indices, padding_idx):
        ctx.save_for_backward(ids, indices)
        ctx.shape, ctx.padding_idx = weight.shape, padding_idx
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_y):
        ids, indices = ctx.saved_tensors
        vocab, hidden = ctx.shape
        ids, dy = ids.reshape(-1), grad_y.reshape(-1, hidden)
        rows, inverse = torch.unique(ids, return_inverse=True)  # the tokens seen: [U]
        summed = dy.new_zeros(rows.numel(), hidden, dtype=torch.float32).index_add_(0, inverse, dy.float())
        if ctx.padding_idx is not None:
            summed[rows == ctx.padding_idx % vocab] = 0  # nn.Embedding never trains its padding row
        slot = torch.full((vocab,), -1, dtype=torch.int64, device=ids.device)
        slot[rows] = torch.arange(rows.numel(), device=ids.device)
        at = slot[indices // hidden]  # each support element's row among the tokens seen, or -1
        grad = summed.reshape(-1)[(at.clamp(min=0) * hidden + indices % hidden)]
        return None, None, grad.masked_fill_(at < 0, 0), None, None


class SparseModel(nn.Module):
    """Wrap `model` so that only a sparse subset of its weights trains (module docstring).

    Either a new seeded support (`density`, `seed`, `targets` — preset names or regexes over the
    checkpoint's tensor names, as `create` takes them — and `exclude`), or `adapter` (a path or
    Adapter) to continue training from its supports and values. Tensors matching a regex of
    `dense` (by model or checkpoint name; e.g. a new classification head: weights, biases, norms)
    train in full and are saved whole, ``cast(W0 + Δ)``, rather than as deltas.

    `base` is the checkpoint the model was loaded from (a Checkpoint or its path; by default the
    model's ``config.name_or_path`` when that is a local checkpoint). The adapter is keyed by its
    tensor names (`spra_tools.names`: ``base_model_prefix``, renames on load, tied weights) and
    records its dtypes and fingerprints, so it applies to that checkpoint whatever class and
    dtype trained it. Without a checkpoint the model's own names and weights stand in; a model with
    quantized layers needs one (their fingerprints come from its full-precision values).
    """

    def __init__(self, model: nn.Module, density: float | None = None, seed: int | None = None,
                 targets=("vo",), exclude=(), adapter: str | os.PathLike | Adapter | None = None,
                 dense=(), base: Checkpoint | str | os.PathLike | None = None):  # fmt: skip
        super().__init__()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        params = dict(model.named_parameters())
        self.base = _checkpoint_of(model) if base is None else base if isinstance(base, Checkpoint) else _open(base)
        self.names = NameMap(model, None if self.base is None else self.base.names())
        ckpt_name = {n: self.names.checkpoint_name(n) for n in params}
        qlayers = quantized.quantized_layers(model)
        shapes = {n: quantized.logical_shape(qlayers[n]) if n in qlayers else tuple(p.shape) for n, p in params.items()}
        self._dense = set()
        if dense:
            by_model = set(select(((n, "F32", shapes[n]) for n in params), list(dense)))
            by_ckpt = set(select(((ckpt_name[n], "F32", shapes[n]) for n in params), list(dense)))
            self._dense = {n for n in params if n in by_model or ckpt_name[n] in by_ckpt}
        if adapter is not None:
            adapter = adapter if isinstance(adapter, Adapter) else Adapter.load(adapter)
            supports = {self._model_name(n, params): d.support for n, d in adapter.deltas.items()}
            with torch.no_grad():
                for name, values in adapter.dense.items():
                    name = self._model_name(name, params)
                    if name in self._dense:
                        params[name].copy_(values.reshape(params[name].shape))
        else:
            if density is None or seed is None:
                raise SpraError("SparseModel needs density and seed (or an adapter)")
            candidates = [(ckpt_name[n], "F32", shapes[n]) for n in params if n not in self._dense]
            chosen = set(select(candidates, targets, exclude)) if candidates else set()
            # Seeded supports are drawn under checkpoint names: the ones `create` draws on the base.
            supports = {
                n: SeededSupport(seed, ckpt_name[n], math.prod(shapes[n]), density)
                for n in params
                if ckpt_name[n] in chosen
            }
        supports.update({n: SeededSupport(0, ckpt_name[n], params[n].numel(), 1.0) for n in self._dense})
        if not supports:
            raise SpraError("no weight of this model matches the targets")
        holders = _weight_holders(model)
        self.deltas = nn.ParameterDict()
        self._sites: dict[str, tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = {}  # name -> W, idx, W0[s]
        self._patched: list[nn.Module] = []
        self._parametrized: list[tuple[nn.Module, str]] = []
        self._unmerged: dict[str, quantized.UnmergedDelta] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}  # name -> the whole weight's shape
        for name, support in supports.items():
            if name in qlayers:
                if name in self._dense:
                    raise SpraError(f"tensor {name!r}: a quantized layer cannot train densely")
                key = ckpt_name[name]
                init = adapter.deltas[key].values.float() if adapter is not None else torch.zeros(support.count)
                self._unmerged[name] = site = quantized.UnmergedDelta.of(key, qlayers[name], support, self.base, model)
                self.base = site.checkpoint  # opened once for all layers
                key = name.replace(".", "/")
                self.deltas[key] = nn.Parameter(init.to(qlayers[name].weight.device))
                site.layer.patch(lambda key=key: self.deltas[key])
                continue
            weight = params.get(name)
            whole = name in self._dense and not holders.get(id(weight))
            if weight is None or not (holders.get(id(weight)) or whole):
                raise SpraError(f"tensor {name!r}: not the weight of a Linear, Conv1D or Embedding layer of this model")
            idx = ops.support_indices(support, weight.device)
            target, target_idx, part = self._local(name, weight, idx)
            original = ops.gather(target.data, target_idx).clone()
            init = (
                adapter.deltas[ckpt_name[name]].values.float()
                if name not in self._dense and adapter is not None
                else torch.zeros(support.count)
            )
            key = name.replace(".", "/")
            self.deltas[key] = nn.Parameter(init[part].to(weight.device))
            self._sites[name] = (target, target_idx, original)
            self._shapes[name] = tuple(weight.shape)
            if whole:  # a bias or norm weight of the head: its module reads it through `_Whole`
                self._parametrize(model, name, key)
            for module in holders.get(id(weight), ()):  # tied weights: every user contributes to one delta
                self._patch(module, key, idx)
        self._supports = supports
        # DDP syncs only the deltas; the frozen base is identical on every rank by construction.
        self._ddp_params_and_buffers_to_ignore = [
            f"model.{n}" for n, _ in [*model.named_parameters(), *model.named_buffers()]
        ]
        self.sync()

    def _model_name(self, checkpoint_name: str, params: dict) -> str:
        """The model parameter an adapter's tensor (keyed by checkpoint name) belongs to."""
        name = self.names.model_name(checkpoint_name) or checkpoint_name
        if name not in params:
            raise SpraError(f"tensor {checkpoint_name!r} of the adapter: no parameter of this model holds it")
        return name

    def _parametrize(self, model: nn.Module, name: str, key: str) -> None:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        parametrize.register_parametrization(module, attr, _Whole(self.deltas, key), unsafe=True)
        self._parametrized.append((module, attr))

    def _patch(self, module: nn.Module, key: str, idx: torch.Tensor) -> None:
        if isinstance(module, nn.Embedding):
            if module.max_norm is not None or module.scale_grad_by_freq:
                raise SpraError(f"embedding {type(module).__name__}: max_norm / scale_grad_by_freq are not supported")

            def lookup(ids, module=module):
                return _SupportEmbedding.apply(ids, module.weight, self._grad_input(key), idx, module.padding_idx)

            if type(module).forward is not nn.Embedding.forward:  # e.g. Gemma's scaled embedding
                module._spra_lookup = lookup
                module.__class__ = _with_support_lookup(type(module))
                self._patched.append(module)
                return
            forward = lookup
        else:
            transposed = type(module).__name__ == "Conv1D"  # GPT-2: weight [in, out], y = x W + b

            def forward(x, module=module):
                return _SupportLinear.apply(x, module.weight, module.bias, self._grad_input(key), idx, transposed)

        module.forward = forward
        self._patched.append(module)

    # Where this process's part of an adapted weight lives: the hooks `distributed.ShardedSparseModel`
    # overrides to keep only a rank's shard of each weight and its segment of the support.
    def _local(self, name: str, weight: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, slice]:
        """(the tensor the optimizer writes, the support's flat indices into it, the slice of the
        support's values they are): in one process the whole weight and the whole support."""
        return weight, idx, slice(None)

    def _grad_input(self, key: str) -> torch.Tensor:
        """The tensor an adapted layer's support gradient (whole support, [count] fp32) is returned for."""
        return self.deltas[key]

    def whole(self, name: str, part: torch.Tensor) -> torch.Tensor:
        """A per-support-element tensor of `name` (delta, moment, original) over its whole support,
        from this process's part: itself here (under FSDP2 a collective every rank calls)."""
        return part

    def part(self, name: str, whole: torch.Tensor) -> torch.Tensor:
        """The inverse of `whole`: this process's part of a whole per-support-element tensor."""
        return whole

    def _architecture(self) -> str:
        """The model's class name, as transformers knows it."""
        return type(self.model).__name__

    def _global_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """The gradient norm over every process's deltas, from this process's (`norm`)."""
        return norm

    def parameters(self, recurse: bool = True):  # only the master deltas train
        return self.deltas.parameters()

    def __getattr__(self, name: str):
        """Anything else is the wrapped model's (config, generate, ...), as trainers expect of a model."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def sites(self):
        """(name, delta parameter, weight, support indices, originals) of every adapted tensor; weight
        and originals are None for a quantized layer (its delta is never written into it)."""
        for name, (weight, idx, original) in self._sites.items():
            yield name, self.deltas[name.replace(".", "/")], weight, idx, original
        for name, site in self._unmerged.items():
            yield name, self.deltas[name.replace(".", "/")], None, site.layer.indices, None

    @torch.no_grad()
    def sync(self) -> None:
        """Write ``W[s] = cast(W0[s] + Δ)`` for every adapted weight (after a plain optimizer's step)."""
        for _, delta, weight, idx, original in self.sites():
            if weight is not None:
                ops.restore(weight.data, idx, original)
                ops.scatter_apply(weight.data, idx, delta.detach())

    @torch.no_grad()
    def restore(self) -> None:
        """The base weights, bit for bit (the deltas are kept; `sync` re-applies them)."""
        for _, _, weight, idx, original in self.sites():
            if weight is not None:
                ops.restore(weight.data, idx, original)

    def merged(self) -> nn.Module:
        """The plain model with the deltas merged (``cast(W0 + Δ)``, what `apply` gives for fp32
        values), its layers unpatched and trainable again; this wrapper is spent afterwards."""
        if self._unmerged:
            raise SpraError("quantized layers cannot take the deltas in place: save the adapter and apply it to the "
                            "full-precision checkpoint")  # fmt: skip
        self.sync()
        for module in self._patched:
            if "_spra_lookup" in module.__dict__:
                module.__class__ = type(module).__mro__[1]
                del module._spra_lookup
            else:
                del module.forward
        for module, attr in self._parametrized:  # the original tensor holds cast(W0 + Δ) already
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        for p in self.model.parameters():
            p.requires_grad_(True)
        self._patched, self._parametrized, self._sites = [], [], {}
        return self.model

    def adapter(self, values_dtype: torch.dtype = torch.bfloat16, provenance: dict | None = None,
                task: dict | None = None) -> Adapter:  # fmt: skip
        """The trained adapter, keyed by checkpoint names. Each tensor records the checkpoint's dtype and
        the fingerprints of the checkpoint's values (read from it where the model was loaded in
        another dtype); the task records the model class that trained it (`apply` writes it to the
        config as the architecture)."""
        deltas, dense = {}, {}
        converted = False
        for name, delta, weight, _, original in self.sites():
            key = self.names.checkpoint_name(name)
            if name in self._unmerged:
                deltas[key] = self._unmerged[name].delta(delta.detach().to(values_dtype).cpu())
                continue
            shape = self._shapes[name]
            if name in self._dense:  # its support is every element, so `whole` gathers the weight
                value = self.whole(name, weight.detach().reshape(-1)).reshape(shape).clone().cpu()
                if self.base is not None and key in self.base:  # stored in the checkpoint's dtype
                    value = value.to(TORCH_DTYPES[self.base.info(key).dtype])
                dense[key] = value
                continue
            dtype, base_values = weight.dtype, self.whole(name, original).cpu()
            if self.base is not None and key in self.base and self.base.info(key).dtype != dtype_name(dtype):
                stored = self.base.view(key)
                indices = ops.support_indices(self._supports[name])  # the whole support, on the host
                dtype, base_values, converted = stored.dtype, ops.gather(stored, indices), True
            values = self.whole(name, delta.detach()).to(values_dtype).cpu()
            deltas[key] = TensorDelta(key, shape, dtype, self._supports[name], values, fingerprints(base_values))
        if self.base is not None:
            base = self.base.identity()
        else:
            base = {"name": getattr(getattr(self.model, "config", None), "name_or_path", None) or None}
        provenance = {"method": "train", **(provenance or {})}
        task = {**({"architecture": self._architecture()} if task else {}), **(task or {})}
        if self._unmerged:  # how the base was quantized; the checkpoint is recorded as for any base
            provenance["quantization"] = quantized.quantization_record(self.model)
        # Trained in another dtype than the checkpoint's, or on a quantized copy of it, the weights
        # `apply` writes differ from the trained model's.
        exact = values_dtype == torch.float32 and not converted and not self._unmerged
        return Adapter(deltas, dense, base, task, provenance, exact)

    def save(self, path: str | os.PathLike, values_dtype: torch.dtype = torch.bfloat16, overwrite: bool = False,
             provenance: dict | None = None, task: dict | None = None, inputs: tuple = ()) -> None:  # fmt: skip
        """Write the trained adapter (fp32 values reproduce the trained weights bit for bit); `inputs`
        as in Adapter.save."""
        self.adapter(values_dtype, provenance, task).save(path, overwrite, inputs=inputs)


class _DenseGrad(torch.autograd.Function):
    """A head tensor as it is (it holds ``cast(W0 + Δ)``); its gradient goes to the fp32 delta Δ."""

    @staticmethod
    def forward(ctx, weight, delta):
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return None, grad.reshape(-1).float()


class _Whole(nn.Module):
    """Parametrization of a tensor trained whole that no patched layer reads (a bias, a norm weight):
    the module sees the tensor, autograd sees the delta."""

    def __init__(self, deltas: nn.ParameterDict, key: str):
        super().__init__()
        self._delta = lambda: deltas[key]  # not a submodule: the delta is SparseModel's, not the model's

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _DenseGrad.apply(weight, self._delta())


def _open(base: str | os.PathLike) -> Checkpoint:
    try:
        return open_checkpoint(base)
    except SpraError as e:
        raise SpraError(f"the base checkpoint given to SparseModel: {e}") from None


def _checkpoint_of(model: nn.Module) -> Checkpoint | None:
    """The local checkpoint `model` was loaded from (transformers records its path), if any."""
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "name_or_path", None)
    if not path or not Path(path).exists():
        return None
    try:
        return open_checkpoint(path)
    except SpraError:
        return None


class _SupportLookup(nn.Embedding):
    """nn.Embedding's lookup through `_SupportEmbedding`, for an embedding subclass whose own forward
    wraps ``super().forward`` (Gemma's ``embed_scale``): the patched module's class becomes
    (its class, _SupportLookup), so its forward runs unchanged around the sparse-gradient lookup."""

    def forward(self, input):
        return self._spra_lookup(input)


_LOOKUP_CLASSES: dict[type, type] = {}


def _with_support_lookup(cls: type) -> type:
    if cls not in _LOOKUP_CLASSES:
        _LOOKUP_CLASSES[cls] = type(cls.__name__, (cls, _SupportLookup), {"__module__": cls.__module__})
    return _LOOKUP_CLASSES[cls]


def _weight_holders(model: nn.Module) -> dict[int, list[nn.Module]]:
    """id(weight) -> the supported layers using it as their `weight` (several when tied)."""
    holders: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        w = getattr(module, "weight", None)
        supported = isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D"
        if supported and isinstance(w, torch.Tensor) and w.dim() == 2:
            holders.setdefault(id(w), []).append(module)
    return holders


class SparseAdamW(torch.optim.Optimizer):
    """AdamW over a SparseModel's deltas, fused: one launch per step updates every fp32 delta and
    its moments and writes ``W[s] = cast(W0[s] + Δ)`` (no `sync` needed). Optional clipping of the
    global gradient norm to `max_grad_norm` (the norm before clipping is kept in `last_grad_norm`).
    Math: ``ops.reference.adamw_update`` — torch.optim.AdamW's, with every operation in fp32."""

    def __init__(self, model: SparseModel, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, max_grad_norm: float | None = None):  # fmt: skip
        if not isinstance(model, SparseModel):
            raise TypeError("SparseAdamW trains a SparseModel")
        sites = list(model.sites())
        super().__init__([s[1] for s in sites], dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._sites = {id(s[1]): s for s in sites}
        self._global_norm = model._global_norm
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        scale = None
        if live:
            norm = self._global_norm(torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in live]))))
            self.last_grad_norm = norm
            if self.max_grad_norm is not None:
                scale = (self.max_grad_norm / (norm + 1e-6)).clamp_(max=1.0).to(torch.float32).reshape(1)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["step"] += 1
            for step in sorted({self.state[p]["step"] for p in params}):  # one launch when all are in step
                same = [p for p in params if self.state[p]["step"] == step]
                unmerged = [p for p in same if self._sites[id(p)][2] is None]  # quantized layers: no write-back
                if unmerged:
                    ops.adamw_step_deltas(
                        [p.data for p in unmerged], [p.grad.float().contiguous() for p in unmerged],
                        [self.state[p]["exp_avg"] for p in unmerged], [self.state[p]["exp_avg_sq"] for p in unmerged],
                        lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                        step=step, grad_scale=None if scale is None else scale.to(unmerged[0].device),
                    )  # fmt: skip
                    same = [p for p in same if self._sites[id(p)][2] is not None]
                    if not same:
                        continue
                sites = [self._sites[id(p)] for p in same]
                ops.adamw_step(
                    [s[2].data for s in sites],
                    [s[3] for s in sites],
                    [s[4] for s in sites],
                    [p.data for p in same],
                    [p.grad.float().contiguous() for p in same],
                    [self.state[p]["exp_avg"] for p in same],
                    [self.state[p]["exp_avg_sq"] for p in same],
                    lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                    step=step, grad_scale=None if scale is None else scale.to(same[0].device),
                )  # fmt: skip
        return loss
