"""SpaRTA training under FSDP2: the base sharded by `fully_shard` per decoder layer, the deltas and
their optimizer state sharded with it, and only the small delta gradients reduced.

    model = shard_model(model, torch.device("cuda", local_rank))  # fully_shard per decoder layer, then the root
    sm = ShardedSparseModel(model, density=0.01, seed=0, targets=["vo"])
    opt = SparseAdamW(sm, lr=1e-3)    # steps this rank's deltas; writes cast(W0 + Δ) into its shards
    loss = sm(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
    sm.adapter()                      # a collective: every rank gets the whole adapter; rank 0 saves it

fully_shard makes each weight a DTensor sharded by rows (Shard(0)), so a rank holds one contiguous
range of the weight's flat index space, and the sorted support splits into one contiguous segment
per rank. A rank keeps the fp32 master deltas, AdamW moments and originals of its segment only; the
fused optimizer writes ``cast(W0 + Δ)`` into the rank's own shard, so the weight FSDP2 all-gathers
for the forward is the adapted one and nothing is added to the forward. The base is frozen
(requires_grad=False), so FSDP2 reduce-scatters no dense gradient. Backward computes each layer's
support gradient on the gathered weight as in one process, over the whole support (a rank's
micro-batch touches every support element), into a zero-stride stand-in of the deltas; as soon as
it exists a hook launches its reduce-scatter (rank-major, each segment padded to the longest), and
the end of backward waits for them and adds each rank's part to its deltas' `.grad`: the mean over
ranks, as DDP takes it. `no_sync()` defers the reduction across accumulated micro-batches.

Every rank regenerates each adapted layer's whole support (microseconds on a GPU): its backward
needs all of it. The rank's segment is then two binary searches at its shard's bounds.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch import nn

from ..errors import SpraError
from .sparse_model import SparseModel


def _reduce_scatter(*args, **kwargs):
    """torch 2.14 renamed reduce_scatter_tensor (deprecating the old name); earlier releases have only that."""
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(*args, **kwargs)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the classes transformers names in `_no_split_modules` (the
    units it never splits across devices, which are FSDP's units too)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise SpraError(f"{type(model).__name__}: no decoder layers to shard (its _no_split_modules names none)")
    return layers


def shard_model(model: nn.Module, device: torch.device, mesh=None, mp_policy=None, reshard_after_forward=True):
    """`model` frozen and sharded in place by FSDP2 over all ranks (or `mesh`, 1-D): `fully_shard` on
    every decoder layer, then on the root (embeddings, final norm, head). Its states move to
    `device` one layer at a time. `mp_policy` (a MixedPrecisionPolicy) is fully_shard's, and so is
    `reshard_after_forward`, for the decoder layers; activation checkpointing is the model's own
    (`gradient_checkpointing_enable`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for p in model.parameters():
        p.requires_grad_(False)
    options = dict(mesh=mesh) if mp_policy is None else dict(mesh=mesh, mp_policy=mp_policy)
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, **options)  # the root stays gathered from forward to backward (FSDP2's default)
    return model


class ShardedSparseModel(SparseModel):
    """SparseModel of a model sharded by `shard_model` (module docstring); same arguments as SparseModel.

    Its `sites()` are this rank's: its shard of each adapted weight, the support's indices into that
    shard, its segment of the deltas and originals; `whole` / `part` convert to and from the whole
    support (what `adapter()` and checkpoints use, so both are those of one process)."""

    def __init__(self, model: nn.Module, *args, **kwargs):
        self._segments: dict[str, list[int]] = {}  # name -> offsets of each rank's segment of the support, and its end
        self._sinks: dict[str, torch.Tensor] = {}  # key -> the zero-stride stand-in receiving the whole support grad
        self._pending: list = []  # (key, reduce-scatter work, its output, this rank's count) of this backward
        self._syncing = True
        self._group = None
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():  # a forward without backward may have left weights gathered
            if isinstance(module, FSDPModule):
                module.reshard()
        super().__init__(model, *args, **kwargs)

    def _local(self, name, weight, idx):
        from torch.distributed.tensor import DTensor, Shard

        if not isinstance(weight, DTensor) or weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
            raise SpraError(f"tensor {name!r}: not sharded by rows over a 1-D mesh (shard the model with shard_model)")
        mesh = weight.device_mesh
        self._group = mesh.get_group()
        world, rank = mesh.size(), mesh.get_local_rank()
        rows, cols = weight.shape[0], weight.numel() // max(weight.shape[0], 1)
        chunk = -(-rows // world)  # fully_shard's split: torch.chunk's rows per rank
        bounds = [min(r * chunk, rows) * cols for r in range(world + 1)]
        local = weight.to_local()  # this rank's rows, in FSDP2's own storage (what it all-gathers)
        if local.numel() != bounds[rank + 1] - bounds[rank] or not local.is_contiguous():
            raise SpraError(f"tensor {name!r}: its shard is not the rows this rank was expected to hold")
        offsets = torch.searchsorted(idx, torch.tensor(bounds, device=idx.device)).tolist()
        self._segments[name] = offsets
        key = name.replace(".", "/")
        sink = torch.empty_strided((idx.numel(),), (0,), dtype=torch.float32, device=idx.device).requires_grad_()
        sink.register_post_accumulate_grad_hook(functools.partial(self._reduce, name, key))
        self._sinks[key] = sink
        part = slice(offsets[rank], offsets[rank + 1])
        return local, idx[part] - bounds[rank], part

    def _grad_input(self, key):
        return self._sinks[key]

    def _architecture(self):
        from torch.distributed.fsdp import FSDPModule

        # fully_shard swapped the model's class for a subclass of FSDPModule and it.
        return next(c for c in type(self.model).__mro__ if not issubclass(c, FSDPModule)).__name__

    def _parametrize(self, model, name, key):
        raise SpraError(f"tensor {name!r}: under FSDP2 only the weights of Linear, Conv1D and Embedding layers "
                        "train (a head's bias or norm weight cannot train whole)")  # fmt: skip

    def _rank(self) -> int:
        return dist.get_rank(self._group)

    def _reduce(self, name: str, key: str, sink: torch.Tensor) -> None:
        """Launch the reduce-scatter of the whole support gradient just accumulated in `sink`."""
        if not self._syncing:
            return
        grad, sink.grad = sink.grad, None
        offsets = self._segments[name]
        world = len(offsets) - 1
        longest = max(b - a for a, b in zip(offsets, offsets[1:]))
        pad = grad.new_zeros(longest)
        pieces = [(grad[a:b], pad[: longest - (b - a)]) for a, b in zip(offsets, offsets[1:])]
        send = torch.cat([t for piece in pieces for t in piece])  # rank-major, each segment padded to the longest
        send.div_(world)  # the mean over ranks, divided before the sum as DDP does
        out = grad.new_empty(longest)
        work = _reduce_scatter(out, send, group=self._group, async_op=True)
        if not self._pending:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        rank = self._rank()
        self._pending.append((key, work, out, offsets[rank + 1] - offsets[rank]))

    def _finish(self) -> None:
        """End of backward: wait for the reductions and add each to this rank's deltas' `.grad`."""
        pending, self._pending = self._pending, []
        for key, work, out, count in pending:
            work.wait()
            delta = self.deltas[key]
            grad = out[:count]
            delta.grad = grad if delta.grad is None else delta.grad.add_(grad)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate the support gradients of the micro-batches inside, reduced at the next backward outside."""
        self._syncing = False
        try:
            yield
        finally:
            self._syncing = True

    def whole(self, name, part):
        offsets = self._segments[name]
        world = len(offsets) - 1
        size = part.element_size()
        longest = max(b - a for a, b in zip(offsets, offsets[1:])) * size
        send = torch.zeros(longest, dtype=torch.uint8, device=part.device)  # bytes: any dtype, any backend
        send[: part.numel() * size] = part.detach().contiguous().view(-1).view(torch.uint8)
        received = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(received, send, group=self._group)
        pieces = [received[r][: (offsets[r + 1] - offsets[r]) * size] for r in range(world)]
        return torch.cat(pieces).view(part.dtype)

    def part(self, name, whole):
        offsets, rank = self._segments[name], self._rank()
        return whole[offsets[rank] : offsets[rank + 1]]

    def _global_norm(self, norm):
        squares = norm.square()
        dist.all_reduce(squares, group=self._group)
        return squares.sqrt()
