"""Many sparse adapters resident beside one base model, one adapter per row of a batch.

    ma = spra_tools.MultiAdapter(model)
    ma.load("math", "math.spra")          # verified against the model's weights once, values on its device
    ma.load("code", code_adapter)
    logits = ma(**batch, adapter_names=["math", "__base__", "code"]).logits
    out = ma.generate(**batch, adapter_names=["math", "code", "math"], max_new_tokens=32)

The base weights are never changed. Each adapted nn.Linear / GPT-2 Conv1D computes its output as
before, then adds to each row the sparse term of that row's adapter, ``x · Δᵀ`` (ops.sparse_addmm,
one launch per layer for the whole batch). Rows named "__base__" get nothing added: they are the
plain model's, bit for bit, and so is every call that goes to the model directly. Works inside
transformers' `generate` (KV cache, greedy, sampling, beams: rows expanded from one input follow
its adapter).

Residency: per device one pool holds every adapter's values (in `values_dtype`) and, unless
`regenerate_supports`, each value's 2-byte offset inside its 2**16-element block (docs: the block
layout in ops/sparse.py); each adapted layer keeps one row of block pointers per adapter. A
0.1 % all-linear adapter of an 8B model is 7 M values: 28 MB resident with offsets, 14 MB with
supports regenerated in the kernel at every forward (slower; seeded adapters only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops
from .adapter import Adapter
from .errors import SpraError
from .live import as_adapter, prepare
from .ops.sparse import block_offsets, num_blocks, seeded_block_counts, transpose_indices
from .support import SeededSupport, as_int64, tensor_key

BASE = "__base__"


@dataclass
class _Site:
    """One adapted layer: the product it adds and one row of block pointers per slot."""

    module: nn.Module
    device: torch.device
    conv1d: bool  # GPT-2 Conv1D: weight [in, out]
    blocks: int
    block_ptrs: torch.Tensor  # [slot capacity, blocks + 1] int64 into the device's pool
    keys: torch.Tensor  # [slot capacity] int64 (regenerated supports)
    own_forward: object = None  # the module's instance-level forward before ours, if it had one


@dataclass
class _Pool:
    """The values (and in-block offsets) of every resident adapter on one device, adapter after adapter."""

    values: torch.Tensor
    offsets: torch.Tensor | None
    used: int = 0


@dataclass
class _Resident:
    slot: int
    spans: dict[torch.device, tuple[int, int]] = field(default_factory=dict)  # device -> (start, count)


@dataclass
class _Staged:
    """One adapter prepared for a device: its values (kernel order), offsets, and per-site block counts."""

    values: list[torch.Tensor] = field(default_factory=list)
    offsets: list[torch.Tensor] = field(default_factory=list)
    sites: list[tuple[nn.Module, torch.Tensor, int]] = field(default_factory=list)  # module, counts, key


class MultiAdapter:
    """Serve sparse adapters on `model` without merging: `load` / `unload` by name, then call the
    model (or `generate`) with ``adapter_names=`` — one name per batch row, or one for all rows,
    "__base__" for none. Inference only (calls run under torch.no_grad)."""

    def __init__(self, model: nn.Module, values_dtype: torch.dtype = torch.bfloat16,
                 regenerate_supports: bool = False):  # fmt: skip
        if values_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise SpraError(f"values_dtype must be bfloat16, float16 or float32, not {values_dtype}")
        self.model = model
        self.values_dtype = values_dtype
        self.regenerate_supports = regenerate_supports
        self._residents: dict[str, _Resident] = {}
        self._pools: dict[torch.device, _Pool] = {}
        self._sites: dict[nn.Module, _Site] = {}
        self._capacity = 4  # slots per site table
        self._call: _Call | None = None  # the running call
        self._holders = _linear_holders(model)

    # --- adapters -------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._residents)

    def load(self, name: str, adapter_or_path) -> None:
        """Verify the adapter against the model's weights (a wrong base is refused, nothing loaded)
        and keep its values on the weights' devices under `name`."""
        if not isinstance(name, str) or not name or name == BASE:
            raise SpraError(f"adapter name must be a non-empty string other than {BASE!r}, got {name!r}")
        if name in self._residents:
            raise SpraError(f"an adapter named {name!r} is already loaded (unload it first)")
        adapter = as_adapter(adapter_or_path)
        where = adapter_or_path if isinstance(adapter_or_path, (str, os.PathLike)) else None
        staged = self._stage(adapter, where)
        slot = self._free_slot()
        resident = _Resident(slot)
        for device, s in staged.items():  # allocate everything first: a failure leaves no trace
            self._reserve(device, sum(v.numel() for v in s.values))
        for module, _, _ in (site for s in staged.values() for site in s.sites):
            self._site(module)
        for device, s in staged.items():
            pool = self._pools[device]
            start, count = pool.used, sum(v.numel() for v in s.values)
            pool.values[start : start + count] = torch.cat(s.values)
            if pool.offsets is not None:
                pool.offsets[start : start + count] = torch.cat(s.offsets)
            pool.used += count
            resident.spans[device] = (start, count)
            position = start
            for module, counts, key in s.sites:
                site = self._sites[module]
                site.block_ptrs[slot, 0] = position
                torch.cumsum(counts, 0, out=site.block_ptrs[slot, 1:])
                site.block_ptrs[slot, 1:] += position
                site.keys[slot] = key
                position += int(counts.sum())
        for site in self._sites.values():  # layers this adapter leaves alone: empty rows
            if not any(site.module is m for s in staged.values() for m, _, _ in s.sites):
                site.block_ptrs[slot] = resident.spans.get(site.device, (0, 0))[0]
        self._residents[name] = resident

    def unload(self, name: str) -> None:
        """Forget adapter `name` and give its memory back to the pool (later adapters move down)."""
        resident = self._residents.pop(self._check_name(name))
        for device, (start, count) in resident.spans.items():
            pool = self._pools[device]
            tail = slice(start + count, pool.used)
            pool.values[start : pool.used - count] = pool.values[tail].clone()
            if pool.offsets is not None:
                pool.offsets[start : pool.used - count] = pool.offsets[tail].clone()
            pool.used -= count
            later = [r for r in self._residents.values() if device in r.spans and r.spans[device][0] > start]
            for r in later:
                r.spans[device] = (r.spans[device][0] - count, r.spans[device][1])
            moved = torch.tensor([r.slot for r in later], dtype=torch.int64, device=device)
            for site in self._sites.values():
                if site.device == device and moved.numel():
                    site.block_ptrs[moved] -= count
        for site in self._sites.values():
            site.block_ptrs[resident.slot] = 0

    def resident_bytes(self, name: str | None = None) -> int:
        """Device memory held for adapter `name` (values, offsets, its block-pointer rows), or for all."""
        if name is None:
            return sum(self.resident_bytes(n) for n in self._residents)
        resident = self._residents[self._check_name(name)]
        per_value = self.values_dtype.itemsize + (0 if self.regenerate_supports else 2)
        values = sum(count for _, count in resident.spans.values()) * per_value
        return values + sum((s.blocks + 1) * 8 + 8 for s in self._sites.values())

    def close(self) -> None:
        """Unload everything and give the layers their own forward back."""
        for module, site in self._sites.items():
            if site.own_forward is None:
                del module.forward
            else:
                module.forward = site.own_forward
        self._sites, self._pools, self._residents = {}, {}, {}

    def _check_name(self, name: str) -> str:
        if name not in self._residents:
            raise SpraError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self._residents) or 'none'})")
        return name

    def _stage(self, adapter: Adapter, where) -> dict[torch.device, _Staged]:
        """Verify and lay out every tensor of `adapter` in the kernel's order, per device."""
        if adapter.dense:
            raise SpraError(
                f"the adapter replaces whole tensors ({', '.join(sorted(adapter.dense))}); they cannot be served "
                "per row: attach it in place or merge it",
                where,
            )
        handle = prepare(self.model, adapter, 1.0, where)  # fingerprints: a wrong base raises here
        if handle.unmerged:
            raise SpraError("MultiAdapter does not serve quantized layers yet (attach the adapter instead)", where)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        staged: dict[torch.device, _Staged] = {}
        for g in handle.groups:
            indices = None if self.regenerate_supports else ops.indices_many(g.supports, g.weights[0].device)
            offset = 0
            for name, weight, support in zip(g.names, g.weights, g.supports):
                values = g.values[offset : offset + support.count].to(self.values_dtype)
                here = slice(offset, offset + support.count)
                offset += support.count
                module = self._holder(name, params[name], where)
                conv1d = _is_conv1d(module)
                s = staged.setdefault(weight.device, _Staged())
                if self.regenerate_supports:
                    if not isinstance(support, SeededSupport):
                        raise SpraError(
                            f"tensor {name!r}: an explicit support cannot be regenerated "
                            "(use a MultiAdapter with regenerate_supports=False)",
                            where,
                        )
                    counts = seeded_block_counts(support, weight.device)
                    key = as_int64(tensor_key(support.seed, support.name))
                else:
                    idx = indices[here]
                    if conv1d:  # lay Δ [in, out] out as Δᵀ [out, in]: the owner-computes product
                        idx, order = transpose_indices(idx, weight.shape[0], weight.shape[1])
                        values = values[order]
                    offsets, counts = block_offsets(idx, weight.numel())
                    s.offsets.append(offsets)
                    key = 0
                s.values.append(values)
                s.sites.append((module, counts, key))
        return staged

    def _holder(self, name: str, param: nn.Parameter, where) -> nn.Module:
        users = self._holders.get(id(param), [])
        if len(users) != 1 or getattr(users[0], "weight", None) is not param:
            raise SpraError(
                f"tensor {name!r}: not the weight of one nn.Linear or Conv1D layer (MultiAdapter serves those; "
                "attach the adapter in place or merge it)",
                where,
            )
        return users[0]

    def _free_slot(self) -> int:
        used = {r.slot for r in self._residents.values()}
        slot = next(s for s in range(len(used) + 1) if s not in used)
        if slot >= self._capacity:
            self._capacity *= 2
            for site in self._sites.values():
                site.block_ptrs = _grown(site.block_ptrs, self._capacity)
                site.keys = _grown(site.keys, self._capacity)
        return slot

    def _reserve(self, device: torch.device, count: int) -> None:
        pool = self._pools.get(device)
        if pool is None:
            pool = self._pools[device] = _Pool(
                torch.empty(0, dtype=self.values_dtype, device=device),
                None if self.regenerate_supports else torch.empty(0, dtype=torch.int16, device=device),
            )
        if pool.used + count > pool.values.numel():
            size = max(pool.used + count, pool.values.numel() * 3 // 2)
            pool.values = _grown(pool.values, size)
            if pool.offsets is not None:
                pool.offsets = _grown(pool.offsets, size)

    def _site(self, module: nn.Module) -> _Site:
        site = self._sites.get(module)
        if site is None:
            w = module.weight
            blocks = num_blocks(w.numel())
            site = _Site(
                module,
                w.device,
                _is_conv1d(module),
                blocks,
                torch.zeros(self._capacity, blocks + 1, dtype=torch.int64, device=w.device),
                torch.zeros(self._capacity, dtype=torch.int64, device=w.device),
            )
            site.own_forward = module.__dict__.get("forward")
            self._sites[module] = site
            module.forward = self._forward(site, module.forward)
        return site

    # --- calls ----------------------------------------------------------------------------------

    def __call__(self, *args, adapter_names, **kwargs):
        """``model(*args, **kwargs)`` with each row's adapter added (``adapter_names``: module docstring)."""
        with self._running(adapter_names), torch.no_grad():
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names, **kwargs):
        """``model.generate(...)`` with each row's adapter added at every step."""
        with self._running(adapter_names), torch.no_grad():
            return self.model.generate(*args, **kwargs)

    def _running(self, adapter_names) -> _Call:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if not names:
            raise SpraError("adapter_names is empty: give one name per row, or one for all rows")
        slots = tuple(-1 if n == BASE else self._residents[self._check_name(n)].slot for n in names)
        return _Call(self, slots[0] if isinstance(adapter_names, str) else slots)

    def _forward(self, site: _Site, forward):
        empty = torch.empty(0, dtype=torch.int64, device=site.device)
        no_offsets, no_keys = empty.short(), empty

        def adapted(x, *args, **kwargs):
            y = forward(x, *args, **kwargs)
            call = self._call
            if call is None:
                return y
            table = call.table(site.device, x)
            if table is None:
                return y
            pool = self._pools[site.device]
            stored = pool.offsets is not None
            call.kernel(site.device)(
                y.view(-1, y.shape[-1]), call.operand(x, y.dtype, table), pool.values, site.block_ptrs,
                pool.offsets if stored else no_offsets, no_keys if stored else site.keys,
                table.tensor, table.max_rows, site.conv1d and not stored,
            )  # fmt: skip
            return y

        return adapted


class _Call:
    """One `MultiAdapter` call: the slot of each row, and what its layers share — segment tables per
    input shape, the kernel per device, the last input made feature-major (q, k, v share theirs)."""

    def __init__(self, ma: MultiAdapter, slots):
        self.ma, self.slots = ma, slots
        self.tables: dict = {}
        self.kernels: dict = {}
        self.last: tuple | None = None  # (x, its feature-major copy)

    def __enter__(self):
        if self.ma._call is not None:
            raise SpraError("MultiAdapter calls do not nest")
        self.ma._call = self

    def __exit__(self, *exc):
        self.ma._call = None

    def kernel(self, device: torch.device):
        if device not in self.kernels:
            self.kernels[device] = ops.sparse_addmm_kernel(device)
        return self.kernels[device]

    def operand(self, x: torch.Tensor, dtype: torch.dtype, table) -> torch.Tensor:
        """x as [rows, features] in the layer's dtype; feature-major where a segment has many rows
        on a GPU (a warp's tokens then read one column in one transaction)."""
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != dtype:  # autocast: the layer ran in another dtype than its input
            x2 = x2.to(dtype)
        if table.max_rows < 8 or x2.device.type != "cuda":
            return x2
        if self.last is None or self.last[0] is not x:
            self.last = (x, x2.t().contiguous().t())
        return self.last[1]

    def table(self, device: torch.device, x: torch.Tensor):
        """The segments for an input of x's shape: the rows of one batch row run together."""
        batch = x.shape[0] if x.dim() > 1 else 1
        length = x.numel() // max(x.shape[-1], 1) // max(batch, 1)
        key = (device, batch, length)
        if key not in self.tables:
            if isinstance(self.slots, int):
                slots = [self.slots] * batch
            elif batch % len(self.slots) == 0:  # generate expands each input row into consecutive copies
                slots = [self.slots[b // (batch // len(self.slots))] for b in range(batch)]
            else:
                raise SpraError(f"a batch of {batch} rows for {len(self.slots)} adapter_names")
            segments, b = [], 0
            while b < batch:
                e = b
                while e < batch and slots[e] == slots[b]:
                    e += 1
                if slots[b] >= 0:
                    segments.append((b * length, e * length, slots[b]))
                b = e
            self.tables[key] = ops.segment_table(segments, device) if segments else None
        return self.tables[key]


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2: weight [in, out], y = x W + b


def _linear_holders(model: nn.Module) -> dict[int, list[nn.Module]]:
    """id(parameter) -> the modules holding it, where a Linear / Conv1D holds it as its weight."""
    holders: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), []).append(module)
    return {k: v for k, v in holders.items() if any(isinstance(m, nn.Linear) or _is_conv1d(m) for m in v)}


def _grown(t: torch.Tensor, size: int) -> torch.Tensor:
    """`t` with its first dimension grown to `size` (new entries zero)."""
    out = t.new_zeros((size, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out
