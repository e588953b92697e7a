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
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import ops
from ..adapter import Adapter, TensorDelta
from ..errors import SpraError
from ..fingerprint import fingerprints
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

    Either a new seeded support (`density`, `seed`, `targets` — preset names or regexes — and
    `exclude`), or `adapter` (a path or Adapter) to continue training from its supports and values.
    Tensors matching a regex of `dense` (e.g. a new classification head) train in full and are
    saved as dense tensors, ``cast(W0 + Δ)``, rather than as deltas.
    """

    def __init__(self, model: nn.Module, density: float | None = None, seed: int | None = None,
                 targets=("vo",), exclude=(), adapter: str | os.PathLike | Adapter | None = None,
                 dense=()):  # fmt: skip
        super().__init__()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        params = dict(model.named_parameters())
        self._dense = (
            set(select(((n, "F32", tuple(p.shape)) for n, p in params.items()), list(dense))) if dense else set()
        )
        if adapter is not None:
            adapter = adapter if isinstance(adapter, Adapter) else Adapter.load(adapter)
            supports = {n: d.support for n, d in adapter.deltas.items()}
            with torch.no_grad():
                for name, values in adapter.dense.items():
                    if name in params and name in self._dense:
                        params[name].copy_(values.reshape(params[name].shape))
        else:
            if density is None or seed is None:
                raise SpraError("SparseModel needs density and seed (or an adapter)")
            names = select(((n, "F32", tuple(p.shape)) for n, p in params.items()), targets, exclude)
            supports = {n: SeededSupport(seed, n, params[n].numel(), density) for n in names}
        supports.update({n: SeededSupport(0, n, params[n].numel(), 1.0) for n in self._dense})
        if not supports:
            raise SpraError("no weight of this model matches the targets")
        holders = _weight_holders(model)
        self.deltas = nn.ParameterDict()
        self._sites: dict[str, tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = {}  # name -> W, idx, W0[s]
        self._patched: list[nn.Module] = []
        for name, support in supports.items():
            weight = params.get(name)
            if weight is None or not holders.get(id(weight)):
                raise SpraError(f"tensor {name!r}: not the weight of a Linear, Conv1D or Embedding layer of this model")
            idx = ops.support_indices(support, weight.device)
            original = ops.gather(weight.data, idx).clone()
            init = adapter.deltas[name].values.float() if adapter is not None else torch.zeros(support.count)
            key = name.replace(".", "/")
            self.deltas[key] = nn.Parameter(init.to(weight.device))
            self._sites[name] = (weight, idx, original)
            for module in holders[id(weight)]:  # tied weights: every user contributes to one delta
                self._patch(module, key, idx)
        self._supports = supports
        # DDP syncs only the deltas; the frozen base is identical on every rank by construction.
        self._ddp_params_and_buffers_to_ignore = [
            f"model.{n}" for n, _ in [*model.named_parameters(), *model.named_buffers()]
        ]
        self.sync()

    def _patch(self, module: nn.Module, key: str, idx: torch.Tensor) -> None:
        if isinstance(module, nn.Embedding):
            if module.max_norm is not None or module.scale_grad_by_freq:
                raise SpraError(f"embedding {type(module).__name__}: max_norm / scale_grad_by_freq are not supported")

            def forward(ids, module=module):
                return _SupportEmbedding.apply(ids, module.weight, self.deltas[key], idx, module.padding_idx)

        else:
            transposed = type(module).__name__ == "Conv1D"  # GPT-2: weight [in, out], y = x W + b

            def forward(x, module=module):
                return _SupportLinear.apply(x, module.weight, module.bias, self.deltas[key], idx, transposed)

        module.forward = forward
        self._patched.append(module)

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
        """(name, delta parameter, weight, support indices, originals) of every adapted tensor."""
        for name, (weight, idx, original) in self._sites.items():
            yield name, self.deltas[name.replace(".", "/")], weight, idx, original

    @torch.no_grad()
    def sync(self) -> None:
        """Write ``W[s] = cast(W0[s] + Δ)`` for every adapted weight (after a plain optimizer's step)."""
        for _, delta, weight, idx, original in self.sites():
            ops.restore(weight.data, idx, original)
            ops.scatter_apply(weight.data, idx, delta.detach())

    @torch.no_grad()
    def restore(self) -> None:
        """The base weights, bit for bit (the deltas are kept; `sync` re-applies them)."""
        for _, _, weight, idx, original in self.sites():
            ops.restore(weight.data, idx, original)

    def merged(self) -> nn.Module:
        """The plain model with the deltas merged (``cast(W0 + Δ)``, what `apply` gives for fp32
        values), its layers unpatched and trainable again; this wrapper is spent afterwards."""
        self.sync()
        for module in self._patched:
            del module.forward
        for p in self.model.parameters():
            p.requires_grad_(True)
        self._patched, self._sites = [], {}
        return self.model

    def adapter(self, values_dtype: torch.dtype = torch.bfloat16, provenance: dict | None = None,
                task: dict | None = None) -> Adapter:  # fmt: skip
        deltas, dense = {}, {}
        for name, delta, weight, _, original in self.sites():
            if name in self._dense:
                dense[name] = weight.detach().clone().cpu()
                continue
            values = delta.detach().to(values_dtype).cpu()
            deltas[name] = TensorDelta(
                name, tuple(weight.shape), weight.dtype, self._supports[name], values, fingerprints(original.cpu())
            )
        base = {"name": getattr(getattr(self.model, "config", None), "name_or_path", None) or None}
        provenance = {"method": "train", **(provenance or {})}
        return Adapter(deltas, dense, base, task or {}, provenance, values_dtype == torch.float32)

    def save(self, path: str | os.PathLike, values_dtype: torch.dtype = torch.bfloat16, overwrite: bool = False,
             provenance: dict | None = None, task: dict | None = None, inputs: tuple = ()) -> None:  # fmt: skip
        """Write the trained adapter (fp32 values reproduce the trained weights bit for bit); `inputs`
        as in Adapter.save."""
        self.adapter(values_dtype, provenance, task).save(path, overwrite, inputs=inputs)


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
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in live])))
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
