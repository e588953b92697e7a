"""The spra_tools torch ops: schema, fake (meta) kernel and pure-torch default kernel of each.

The ops exist without the compiled extension: the default kernels (the reference backend) serve
any device; when the extension is loaded its CPU / CUDA kernels take over for those devices.
Seeded ops take a whole model's adapted tensors at once — `keys` are the tensors' 64-bit support
keys (support.tensor_key) as signed int64 (support.as_int64), values and originals are flat in tensor order.
"""

from __future__ import annotations

import torch

from .. import support as sup
from . import reference

NS = "spra_tools"

_SCHEMAS = {
    "seeded_indices": "(Tensor device_like, int[] keys, int[] numels, float[] densities) -> Tensor",
    "seeded_gather": "(Tensor[] weights, int[] keys, float[] densities) -> Tensor",
    "seeded_apply": "(Tensor(a!)[] weights, int[] keys, float[] densities, Tensor values, float scale, "
    "bool save_originals) -> Tensor",
    "seeded_restore": "(Tensor(a!)[] weights, int[] keys, float[] densities, Tensor originals) -> ()",
    "gather": "(Tensor weight, Tensor indices) -> Tensor",
    "scatter_apply": "(Tensor(a!) weight, Tensor indices, Tensor values, float scale) -> ()",
    "restore": "(Tensor(a!) weight, Tensor indices, Tensor original) -> ()",
    "gather_many": "(Tensor[] weights, Tensor indices, int[] counts) -> Tensor",
    "scatter_apply_many": "(Tensor(a!)[] weights, Tensor indices, int[] counts, Tensor values, float scale, "
    "bool save_originals) -> Tensor",
    "restore_many": "(Tensor(a!)[] weights, Tensor indices, int[] counts, Tensor originals) -> ()",
    "sampled_grad": "(Tensor a, Tensor b, Tensor indices) -> Tensor",
    "adamw_step": "(Tensor(a!)[] weights, Tensor[] indices, Tensor[] originals, Tensor(b!)[] deltas, Tensor[] grads, "
    "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, float lr, float beta1, float beta2, float eps, "
    "float weight_decay, float step_size, float inv_sqrt_bias_correction2, Tensor? grad_scale) -> ()",
    # out[rows of segment s] += x[rows] · M_slot(s)ᵀ (transposed: x · M): contract in reference.sparse_addmm.
    "sparse_addmm": "(Tensor(a!) out, Tensor x, Tensor values, Tensor block_ptrs, Tensor offsets, Tensor keys, "
    "Tensor segments, int max_rows, bool transposed) -> ()",
}

for _name, _schema in _SCHEMAS.items():
    torch.library.define(f"{NS}::{_name}", _schema)


def _count(numels, densities) -> int:
    return sum(sup.seeded_count(n, d) for n, d in zip(numels, densities))


def _reference_indices(keys, numels, densities, device) -> list[torch.Tensor]:
    return [reference.seeded_indices_for_key(k & sup.MASK64, n, d, device) for k, n, d in zip(keys, numels, densities)]


# --- default kernels: the reference backend -----------------------------------------------------

DEFAULTS: dict = {}  # op name -> its default kernel, for calling the reference backend directly


def _default(name: str):
    def register(fn):
        torch.library.impl(f"{NS}::{name}", "CompositeExplicitAutograd")(fn)
        DEFAULTS[name] = fn
        return fn

    return register


@_default("seeded_indices")
def _seeded_indices(device_like, keys, numels, densities):
    parts = _reference_indices(keys, numels, densities, device_like.device)
    return torch.cat(parts) if parts else device_like.new_empty(0, dtype=torch.int64)


@_default("seeded_gather")
def _seeded_gather(weights, keys, densities):
    idx = _reference_indices(keys, [w.numel() for w in weights], densities, weights[0].device if weights else "cpu")
    parts = [reference.gather(w, i) for w, i in zip(weights, idx)]
    return torch.cat(parts) if parts else torch.empty(0)


@_default("seeded_apply")
def _seeded_apply(weights, keys, densities, values, scale, save_originals):
    if not weights:
        return values.new_empty(0)
    idx = _reference_indices(keys, [w.numel() for w in weights], densities, weights[0].device)
    originals, offset = [], 0
    for w, i in zip(weights, idx):
        if save_originals:
            originals.append(reference.gather(w, i))
        reference.scatter_apply(w, i, values[offset : offset + i.numel()], scale)
        offset += i.numel()
    return torch.cat(originals) if originals else weights[0].new_empty(0)


@_default("seeded_restore")
def _seeded_restore(weights, keys, densities, originals):
    if not weights:
        return
    idx = _reference_indices(keys, [w.numel() for w in weights], densities, weights[0].device)
    offset = 0
    for w, i in zip(weights, idx):
        reference.restore(w, i, originals[offset : offset + i.numel()])
        offset += i.numel()


@_default("gather")
def _gather(weight, indices):
    return reference.gather(weight, indices)


@_default("scatter_apply")
def _scatter_apply(weight, indices, values, scale):
    reference.scatter_apply(weight, indices, values, scale)


@_default("restore")
def _restore(weight, indices, original):
    reference.restore(weight, indices, original)


def _segments(indices, counts) -> list[torch.Tensor]:
    """The per-tensor int64 index segments of a *_many call's flat `indices`."""
    return list(indices.to(torch.int64).split(list(counts)))


@_default("gather_many")
def _gather_many(weights, indices, counts):
    return torch.cat([reference.gather(w, i) for w, i in zip(weights, _segments(indices, counts))])


@_default("scatter_apply_many")
def _scatter_apply_many(weights, indices, counts, values, scale, save_originals):
    originals = _gather_many(weights, indices, counts) if save_originals else weights[0].new_empty(0)
    for w, i, v in zip(weights, _segments(indices, counts), values.split(list(counts))):
        reference.scatter_apply(w, i, v, scale)
    return originals


@_default("restore_many")
def _restore_many(weights, indices, counts, originals):
    for w, i, o in zip(weights, _segments(indices, counts), originals.split(list(counts))):
        reference.restore(w, i, o)


@_default("sampled_grad")
def _sampled_grad(a, b, indices):
    return reference.sampled_grad(a, b, indices)


@_default("adamw_step")
def _adamw_step(weights, indices, originals, deltas, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps,
                weight_decay, step_size, inv_sqrt_bias_correction2, grad_scale):  # fmt: skip
    for w, i, o, p, g, m, v in zip(weights, indices, originals, deltas, grads, exp_avgs, exp_avg_sqs):
        reference.adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step_size, inv_sqrt_bias_correction2,
                               grad_scale)  # fmt: skip
        reference.restore(w, i, o)
        reference.scatter_apply(w, i, p, 1.0)


@_default("sparse_addmm")
def _sparse_addmm(out, x, values, block_ptrs, offsets, keys, segments, max_rows, transposed):
    reference.sparse_addmm(out, x, values, block_ptrs, offsets, keys, segments, max_rows, transposed)


# --- fake kernels: shapes and dtypes only ------------------------------------------------------


@torch.library.register_fake(f"{NS}::seeded_indices")
def _(device_like, keys, numels, densities):
    return device_like.new_empty(_count(numels, densities), dtype=torch.int64)


@torch.library.register_fake(f"{NS}::seeded_gather")
def _(weights, keys, densities):
    return weights[0].new_empty(_count([w.numel() for w in weights], densities))


@torch.library.register_fake(f"{NS}::seeded_apply")
def _(weights, keys, densities, values, scale, save_originals):
    n = _count([w.numel() for w in weights], densities) if save_originals else 0
    return weights[0].new_empty(n)


@torch.library.register_fake(f"{NS}::seeded_restore")
def _(weights, keys, densities, originals):
    return None


@torch.library.register_fake(f"{NS}::gather")
def _(weight, indices):
    return weight.new_empty(indices.shape)


@torch.library.register_fake(f"{NS}::scatter_apply")
def _(weight, indices, values, scale):
    return None


@torch.library.register_fake(f"{NS}::restore")
def _(weight, indices, original):
    return None


@torch.library.register_fake(f"{NS}::gather_many")
def _(weights, indices, counts):
    return weights[0].new_empty(sum(counts))


@torch.library.register_fake(f"{NS}::scatter_apply_many")
def _(weights, indices, counts, values, scale, save_originals):
    return weights[0].new_empty(sum(counts) if save_originals else 0)


@torch.library.register_fake(f"{NS}::restore_many")
def _(weights, indices, counts, originals):
    return None


@torch.library.register_fake(f"{NS}::sampled_grad")
def _(a, b, indices):
    return a.new_empty(indices.shape, dtype=torch.float32)


@torch.library.register_fake(f"{NS}::adamw_step")
def _(weights, indices, originals, deltas, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay,
      step_size, inv_sqrt_bias_correction2, grad_scale):  # fmt: skip
    return None


@torch.library.register_fake(f"{NS}::sparse_addmm")
def _(out, x, values, block_ptrs, offsets, keys, segments, max_rows, transposed):
    return None
