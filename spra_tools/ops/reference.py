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
    return seeded_indices_from_counts(tensor_key, numel, torch.from_numpy(sup.block_counts(numel, density)).to(device))


def seeded_indices_from_counts(tensor_key: int, numel: int, cum: torch.Tensor) -> torch.Tensor:
    """As seeded_indices_for_key, given the cumulative block counts (support.block_counts) on the target device."""
    key, device = sup.as_int64(tensor_key), cum.device
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


def sparse_addmm(out, x, values, block_ptrs, offsets, keys, segments, max_rows: int, transposed: bool) -> None:
    """The unmerged sparse product, in place: for each segment (first row, end row, slot) of `segments`
    (int32 [S, 3]; disjoint, each at most `max_rows` rows) with slot >= 0, and each of its rows t,
    ``out[t] = cast(fp32(out[t]) + acc[t])`` wherever acc[t] != 0, with acc = x[t] · Mᵀ in fp32
    (transposed: x[t] · M). M is the slot's sparse [rows, cols] matrix — rows = out's features and
    cols = x's (transposed: the reverse); nn.Linear's forward is the plain product with M = Δ, GPT-2
    Conv1D's the transposed one. M's support is cut into blocks of 2**16 flat elements: the slot's
    elements of block b are ``values[block_ptrs[slot, b] : block_ptrs[slot, b + 1]]``, at the sorted
    in-block offsets ``offsets`` holds there (int16 holding uint16, parallel to values) or, when
    `offsets` is empty, at those of the seeded support with key ``keys[slot]`` (the block counts
    then being its closed-form ones). Rows of no segment are untouched."""
    rows, cols = (x.shape[1], out.shape[1]) if transposed else (out.shape[1], x.shape[1])
    numel = rows * cols
    blocks = -(-numel // sup.BLOCK)
    if block_ptrs.dim() != 2 or block_ptrs.shape[1] != blocks + 1:
        raise ValueError(f"block_ptrs must be [slots, {blocks + 1}] for a [{rows}, {cols}] matrix")
    for first, end, slot in segments.tolist():
        if end - first > max_rows:
            raise ValueError(f"segment ({first}, {end}) is longer than max_rows={max_rows}")
        ptr = block_ptrs[slot] if slot >= 0 else None
        if ptr is None or end <= first or int(ptr[-1]) == int(ptr[0]):
            continue
        p0, p1 = int(ptr[0]), int(ptr[-1])
        if offsets.numel():
            starts = torch.repeat_interleave(
                torch.arange(blocks, device=ptr.device) * sup.BLOCK, torch.diff(ptr), output_size=p1 - p0
            )
            flat = (offsets[p0:p1].long() & 0xFFFF) + starts
        else:
            flat = seeded_indices_from_counts(int(keys[slot]) % (1 << 64), numel, ptr[1:] - p0)
        dense = torch.zeros(numel, dtype=torch.float32, device=out.device)
        dense[flat] = values[p0:p1].float()
        dense = dense.view(rows, cols)
        xs = x[first:end].float()
        acc = xs @ dense if transposed else xs @ dense.t()
        o = out[first:end]
        o.copy_(torch.where(acc != 0, (o.float() + acc).to(out.dtype), o))
