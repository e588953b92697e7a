"""The pure-torch reference backend: runs on any device, defines the results compiled kernels match.

Seeded-support generation here is a second implementation of the numpy spec in support.py,
written with int64 tensors (wrapping multiplication, logical shifts emulated by masking), so it
runs on GPU tensors too and serves as an independent check of the spec.
"""

from __future__ import annotations

import torch

from .. import support as sup

_MIX1, _MIX2, _GOLDEN = sup.as_int64(sup.MIX1), sup.as_int64(sup.MIX2), sup.as_int64(sup.GOLDEN)


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """support.mix64 on int64 tensors (the same bits as uint64)."""
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def _feistel(x: torch.Tensor, keys: torch.Tensor, width: int) -> torch.Tensor:
    half, mask = width // 2, (1 << (width // 2)) - 1
    left, right = x >> half, x & mask
    for r in range(sup.ROUNDS):
        left, right = right, left ^ (mix64(keys[:, r] ^ right) & mask)
    return (left << half) | right


def seeded_indices(seed: int, name: str, numel: int, density: float, device) -> torch.Tensor:
    """Sorted int64 flat indices of a seeded support, bit-identical to support.seeded_indices."""
    return seeded_indices_for_key(sup.tensor_key(seed, name), numel, density, device)


def seeded_indices_for_key(tensor_key: int, numel: int, density: float, device) -> torch.Tensor:
    """As seeded_indices, from the tensor's 64-bit support key."""
    key = sup.as_int64(tensor_key)
    cum = torch.from_numpy(sup.block_counts(numel, density)).to(device)
    total = int(cum[-1]) if cum.numel() else 0
    if total == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    counts = torch.diff(cum, prepend=cum.new_zeros(1))
    blocks = torch.arange(cum.numel(), device=device)
    owner = torch.repeat_interleave(blocks, counts, output_size=total)
    j = torch.arange(total, device=device) - (cum - counts)[owner]
    ctr = blocks[:, None] * sup.ROUNDS + torch.arange(1, sup.ROUNDS + 1, device=device)
    keys = mix64(key + ctr * _GOLDEN)[owner]  # [total, ROUNDS]
    y = torch.empty_like(j)
    full = owner < numel // sup.BLOCK
    y[full] = _feistel(j[full], keys[full], sup.BLOCK_BITS)
    if not bool(full.all()):  # the short last block: cycle-walk into its length
        length = numel % sup.BLOCK
        width = sup.feistel_width(length)
        tail_keys = keys[~full]
        t = _feistel(j[~full], tail_keys, width)
        while bool((out := t >= length).any()):
            t[out] = _feistel(t[out], tail_keys[out], width)
        y[~full] = t
    return torch.sort(y + owner * sup.BLOCK).values


# index_select / index_copy_ rather than advanced indexing: on CPU they are ~100x faster.
def gather(weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return torch.index_select(weight.reshape(-1), 0, indices)


def scatter_apply(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, scale: float) -> None:
    """``W[s] = cast(fp32(W[s]) + fp32(scale) * fp32(v))``; each operation rounded to fp32, no FMA."""
    flat = weight.view(-1)
    delta = values.to(torch.float32)
    if scale != 1.0:
        delta = delta * torch.tensor(scale, dtype=torch.float32, device=delta.device)
    summed = torch.index_select(flat, 0, indices).to(torch.float32) + delta
    flat.index_copy_(0, indices, summed.to(weight.dtype))


def restore(weight: torch.Tensor, indices: torch.Tensor, original: torch.Tensor) -> None:
    weight.view(-1).index_copy_(0, indices, original)


def sampled_grad(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``out[n] = Σ_t a[i_n, t] · b[j_n, t]`` in fp32 for flat indices into [rows(a), rows(b)]:
    the dense product gathered at the support (a [R, T], b [C, T], both feature-major)."""
    return (a.float() @ b.float().t()).reshape(-1).index_select(0, indices)


def sampled_grad_token_major(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``out[n] = Σ_t a[t, i_n] · b[t, j_n]`` in fp32 for flat indices into [cols(a), cols(b)]: the
    dense product gathered at the support (a [T, R], b [T, C], token-major)."""
    return (a.float().t() @ b.float()).reshape(-1).index_select(0, indices)


def adamw_update(delta, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step_size,
                 inv_sqrt_bias_correction2, grad_scale) -> None:  # fmt: skip
    """One AdamW update of fp32 `delta` in place, every operation rounded to fp32 in this order
    (the compiled kernel matches it bit for bit). Scalars are derived in float64 and rounded once:
    ``step_size = lr / (1 - beta1**step)``, ``inv_sqrt_bias_correction2 = 1 / sqrt(1 - beta2**step)``."""
    g = grad if grad_scale is None else grad * grad_scale
    exp_avg.mul_(beta1).add_(g * (1.0 - beta1))
    exp_avg_sq.mul_(beta2).add_((g * g) * (1.0 - beta2))
    if weight_decay != 0.0:
        delta.mul_(1.0 - lr * weight_decay)
    denom = exp_avg_sq.sqrt() * inv_sqrt_bias_correction2 + eps  # a product: torch divides by a scalar as one
    delta.sub_((exp_avg / denom) * step_size)
