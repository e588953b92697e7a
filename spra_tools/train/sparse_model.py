"""SparseModel: a transformers model made SpaRTA-trainable, with weight gradients only at the support.

    sm = SparseModel(model, density=0.01, seed=0, targets=["vo"])
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-3)   # only the fp32 master deltas
    loss = model(**batch).loss; loss.backward(); opt.step(); sm.sync()
    sm.save("task.spra")

The forward pass is the untouched model: adapted weights hold ``cast(W0 + Δ)`` in place (`sync`
writes them after each optimizer step). Each adapted `nn.Linear` / GPT-2 `Conv1D` runs through a
custom autograd function that returns the input gradient as usual and, for the weight, only the
gradient at the support: here by the reference rule — the layer's dense ``dYᵀX`` gathered at the
support and dropped before the backward pass leaves the layer. (The compiled SDDMM kernel and fused
optimizer of the training-engine issue go behind the same function.)
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import ops
from ..adapter import Adapter, TensorDelta, fingerprints
from ..errors import SpraError
from ..support import SeededSupport
from ..targets import select


class _SupportLinear(torch.autograd.Function):
    """y = x Wᵀ (+ b) for nn.Linear (W [out, in]); Conv1D (W [in, out]) passes transposed=True."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, indices, transposed):
        ctx.save_for_backward(x, weight, indices)
        ctx.transposed = transposed
        w = weight.t() if transposed else weight
        return torch.nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, indices = ctx.saved_tensors
        w = weight.t() if ctx.transposed else weight  # [out, in]
        grad_x = grad_y @ w.to(grad_y.dtype)
        g2, x2 = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1])
        dense = g2.t().float() @ x2.float()  # [out, in], lives only in this backward
        if ctx.transposed:
            dense = dense.t().contiguous()
        grad_delta = dense.reshape(-1).index_select(0, indices)
        grad_bias = g2.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_delta, None, None


class SparseModel(nn.Module):
    """Wrap `model` so that only a sparse subset of its weights trains (module docstring)."""

    def __init__(self, model: nn.Module, density: float | None = None, seed: int | None = None,
                 targets=("vo",), exclude=(), adapter: str | os.PathLike | Adapter | None = None):  # fmt: skip
        super().__init__()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        if adapter is not None:
            adapter = adapter if isinstance(adapter, Adapter) else Adapter.load(adapter)
            supports = {n: d.support for n, d in adapter.deltas.items()}
        else:
            if density is None or seed is None:
                raise SpraError("SparseModel needs density and seed (or an adapter)")
            params = dict(model.named_parameters())
            names = select(((n, "F32", tuple(p.shape)) for n, p in params.items()), targets, exclude)
            supports = {n: SeededSupport(seed, n, params[n].numel(), density) for n in names}
        modules = dict(model.named_modules())
        self.deltas = nn.ParameterDict()
        self._layers: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}
        for name, support in supports.items():
            module = modules.get(name.rsplit(".", 1)[0])
            if module is None or not hasattr(module, "weight") or module.weight.dim() != 2:
                raise SpraError(f"tensor {name!r}: not the weight of a Linear or Conv1D layer of this model")
            w = module.weight.data
            idx = ops.support_indices(support, w.device)
            original = ops.gather(w, idx).clone()
            init = adapter.deltas[name].values.float() if adapter is not None else torch.zeros(support.count)
            key = name.replace(".", "/")
            self.deltas[key] = nn.Parameter(init.to(w.device))
            self._layers[name] = (module, idx, original)
            self._patch(module, key, idx)
        self._supports = supports
        self.sync()

    def _patch(self, module: nn.Module, key: str, idx: torch.Tensor) -> None:
        transposed = type(module).__name__ == "Conv1D"  # GPT-2: weight [in, out], y = x W + b

        def forward(x, module=module):
            return _SupportLinear.apply(x, module.weight, module.bias, self.deltas[key], idx, transposed)

        module.forward = forward

    def parameters(self, recurse: bool = True):  # only the master deltas train
        return self.deltas.parameters()

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def sync(self) -> None:
        """Write ``W[s] = cast(W0[s] + Δ)`` for every adapted weight (after each optimizer step)."""
        for name, (module, idx, original) in self._layers.items():
            w = module.weight.data
            w.view(-1).index_copy_(0, idx, original)
            ops.scatter_apply(w, idx, self.deltas[name.replace(".", "/")].detach())

    @torch.no_grad()
    def restore(self) -> None:
        """The base weights, bit for bit (the deltas are kept; `sync` re-applies them)."""
        for module, idx, original in self._layers.values():
            ops.restore(module.weight.data, idx, original)

    def adapter(self, values_dtype: torch.dtype = torch.bfloat16, provenance: dict | None = None) -> Adapter:
        deltas = {}
        for name, (module, _, original) in self._layers.items():
            w = module.weight
            values = self.deltas[name.replace(".", "/")].detach().to(values_dtype).cpu()
            deltas[name] = TensorDelta(
                name, tuple(w.shape), w.dtype, self._supports[name], values, fingerprints(original.cpu())
            )
        base = {"name": getattr(getattr(self.model, "config", None), "name_or_path", None) or None}
        provenance = {"method": "train", **(provenance or {})}
        return Adapter(deltas, {}, base, {}, provenance, values_dtype == torch.float32)

    def save(self, path: str | os.PathLike, values_dtype: torch.dtype = torch.bfloat16, overwrite: bool = False,
             provenance: dict | None = None) -> None:  # fmt: skip
        """Write the trained adapter (fp32 values reproduce the trained weights bit for bit)."""
        self.adapter(values_dtype, provenance).save(path, overwrite)
