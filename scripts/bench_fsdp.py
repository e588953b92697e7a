"""SpaRTA training under FSDP2 against DDP: step time, peak memory per GPU and bytes communicated.

Random-init bf16 Llama (sdpa attention), random token ids, a causal-LM loss; one step = forward +
backward + SparseAdamW step + zero_grad, at the same global batch for both (--batch sequences of
--seq tokens per rank). DDP holds the whole base on every GPU and all-reduces the delta gradients;
FSDP2 (`spra_tools.train.distributed`) shards the base per decoder layer (built on the meta device,
each rank initialising only its shards) and reduce-scatters the delta gradients. Supports are LoRA
r16's parameter counts on V,O and on all linears (bench_train.py's budgets). Each row reports the
median step time (the slowest rank's), tokens/s per GPU, the peak allocated memory (the largest
rank's, from the row's start: model, optimizer state, activations), and the bytes each rank puts
into collectives per step, all-gathers and reductions apart (MiB, per rank): counted at the
torch.distributed calls FSDP2 and ShardedSparseModel make; DDP's reducer runs in C++, so its
all-reduce is counted from the gradient sizes it reduces (fp32 deltas). Targets (issue
18, 2 GPUs): FSDP2 peak <= 0.6 x DDP's, tokens/s per GPU >= 0.9 x DDP's.

    torchrun --nproc-per-node 2 scripts/bench_fsdp.py                         # the 8B table, 2 GPUs
    torchrun --nproc-per-node 8 scripts/bench_fsdp.py --shape 70b --modes fsdp --targets vo
    python scripts/bench_fsdp.py --steps 3 --warmup 1                          # world size 1, one GPU
    torchrun --nproc-per-node 2 scripts/bench_fsdp.py --shape tiny --device cpu --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
import transformers
from bench_train import ALL_LINEAR, SHAPES, VO, Shape, build_model, default_dtype, free, sync  # noqa: E402

GIB = 2**30
SHAPES = {**SHAPES, "70b": Shape("70b", 8192, 28672, 80, 64, 8, 128256, 2, 1024)}
TARGETS = {"vo": ("vo", VO), "all": ("all-linear", ALL_LINEAR)}
MODES = ("ddp", "fsdp")

_sent = {"gather": 0, "reduce": 0}  # bytes this rank put into collectives since the last reset


def _count_bytes(name: str) -> None:
    """Wrap torch.distributed.`name` to add its input's bytes to _sent (FSDP2 looks its collectives
    up on the module at each call, so it meets the wrapper)."""
    kind = "gather" if "gather" in name else "reduce"
    original = getattr(dist, name, None)
    if original is None:
        return

    signature = inspect.signature(original)

    @functools.wraps(original)
    def counted(*args, **kwargs):
        given = signature.bind(*args, **kwargs).arguments
        tensor = next(given[k] for k in ("input", "input_tensor", "tensor") if k in given)
        _sent[kind] += tensor.numel() * tensor.element_size()
        return original(*args, **kwargs)

    setattr(dist, name, counted)


def init(device_arg: str) -> tuple[torch.device, int, int]:
    """(device, rank, world): torchrun's process group, or a group of one without torchrun."""
    on_gpu = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if on_gpu:
        torch.cuda.set_device(local)
    backend = "nccl" if on_gpu else "gloo"
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return torch.device("cuda", local) if on_gpu else torch.device("cpu"), rank, world


def build_sharded(shape: Shape, device: torch.device, reshard_after_forward: bool = True):
    """The model on the meta device, sharded by FSDP2, then each rank's shards allocated and filled
    (normal(0, 0.02) for matrices, ones for norms; the seed differs per rank: a random-init benchmark)."""
    from spra_tools.train.distributed import shard_model

    with torch.device("meta"), default_dtype(torch.bfloat16):
        model = transformers.LlamaForCausalLM(shape.config())
    shard_model(model, device, reshard_after_forward=reshard_after_forward)
    model.to_empty(device=device)
    torch.manual_seed(dist.get_rank())
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local()
            local.normal_(0, 0.02) if local.dim() == 2 else local.fill_(1.0)
        rotary = model.model.rotary_emb  # buffers to_empty left uninitialised
        for name, buffer in type(rotary)(rotary.config).named_buffers():
            getattr(rotary, name).copy_(buffer)
        # One forward lets FSDP2 finish its lazy set-up (it may re-pad a shard materialised by
        # to_empty) before the SparseModel keeps references to the shards.
        model(input_ids=torch.zeros(1, 8, dtype=torch.long, device=device))
    return model.train()


def run_row(mode: str, target: str, shape: Shape, device, steps: int, warmup: int, checkpointing: bool,
            keep_gathered: bool) -> dict:  # fmt: skip
    from spra_tools.train import SparseAdamW, SparseModel
    from spra_tools.train.distributed import ShardedSparseModel

    preset, modules = TARGETS[target]
    lora, base = shape.budget(modules)
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if mode == "fsdp":
        model = build_sharded(shape, device, reshard_after_forward=not keep_gathered)
        sm = ShardedSparseModel(model, density=lora / base, seed=0, targets=[preset])
        forward = sm
    else:
        model = build_model(shape, device)
        sm = SparseModel(model, density=lora / base, seed=0, targets=[preset])
        forward = torch.nn.parallel.DistributedDataParallel(
            sm, device_ids=[device.index] if device.index is not None else None
        )
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = SparseAdamW(sm, lr=1e-4)
    values = sum(p.numel() for p in sm.parameters())
    generator = torch.Generator(device).manual_seed(1000 + dist.get_rank())
    x = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=device, generator=generator)
    times = []
    for i in range(warmup + steps):
        if i == warmup:
            _sent.update(gather=0, reduce=0)
        sync(device)
        t0 = time.perf_counter()
        loss = forward(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    gathered, reduced = _sent["gather"] / steps, _sent["reduce"] / steps
    if mode == "ddp" and dist.get_world_size() > 1:
        reduced += values * 4  # the reducer's all-reduce of the fp32 delta gradients
    step_s = torch.tensor([statistics.median(times[warmup:])], dtype=torch.float64)
    peak = torch.tensor([float(torch.cuda.max_memory_allocated(device) - start) if device.type == "cuda" else 0.0],
                        dtype=torch.float64)  # fmt: skip
    if device.type == "cuda":
        step_s, peak = step_s.to(device), peak.to(device)
    dist.all_reduce(step_s, op=dist.ReduceOp.MAX)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    total_values = values
    if mode == "fsdp":  # each rank holds its segment of the deltas
        count = torch.tensor([values], dtype=torch.float64, device=step_s.device)
        dist.all_reduce(count)
        total_values = int(count.item())
    del forward, sm, model, opt
    step = float(step_s.item())
    return {"mode": mode, "targets": target, "values": total_values, "step_ms": step * 1e3,
            "tokens_per_s_per_gpu": shape.batch * shape.seq / step, "peak_gib": float(peak.item()) / GIB,
            "gathered_mib_per_step": gathered / 2**20, "reduced_mib_per_step": reduced / 2**20}  # fmt: skip


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"{meta['date']} · {meta['device']} x {meta['world']} · torch {meta['torch']} · shape {meta['shape']} "
             f"(batch {meta['batch']}x{meta['seq']} per rank)"
             + "".join(f" · {k.replace('_', ' ')}" for k in ("gradient_checkpointing", "keep_gathered") if meta[k]), "",
             "| mode | targets | values | step ms | tokens/s/GPU | peak GiB/GPU | all-gather MiB | reduce MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['targets']} | | {r['error']} | | | | |")
            continue
        lines.append(f"| {r['mode']} | {r['targets']} | {r['values']:,} | {r['step_ms']:.1f} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} | {r['peak_gib']:.2f} | {r['gathered_mib_per_step']:,.2f} | "
                     f"{r['reduced_mib_per_step']:,.2f} |")  # fmt: skip
    by = {(r["mode"], r["targets"]): r for r in rows if "error" not in r}
    for target in TARGETS:
        f, d = by.get(("fsdp", target)), by.get(("ddp", target))
        if f and d and d["peak_gib"] > 0:
            memory, speed = f["peak_gib"] / d["peak_gib"], f["tokens_per_s_per_gpu"] / d["tokens_per_s_per_gpu"]
            lines.append(f"\n{target}: FSDP2 / DDP peak memory {memory:.2f}x (target <= 0.6), "
                         f"tokens/s per GPU {speed:.2f}x (target >= 0.9)")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=["vo", "all"])
    parser.add_argument("--batch", type=int, help="sequences per rank (default: the shape's)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default: the shape's)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--keep-gathered",
        action="store_true",
        help="FSDP2 keeps each layer gathered from forward to backward (reshard_after_forward=False)",
    )
    parser.add_argument("--json", help="also write the rows here (rank 0)")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    shape = Shape(**{**shape.__dict__, "batch": args.batch or shape.batch, "seq": args.seq or shape.seq})
    device, rank, world = init(args.device)
    for name in ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor",
                 "all_reduce", "all_gather"):  # fmt: skip
        _count_bytes(name)
    rows = []
    for mode in args.modes:
        for target in args.targets:
            try:
                row = run_row(mode, target, shape, device, args.steps, args.warmup, args.gradient_checkpointing,
                              args.keep_gathered)  # fmt: skip
            except torch.OutOfMemoryError:
                row = {"mode": mode, "targets": target, "error": "out of memory"}
            except Exception as e:  # one row failing leaves the others
                traceback.print_exc()
                row = {"mode": mode, "targets": target, "error": f"{type(e).__name__}: {str(e)[:80]}"}
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), file=sys.stderr, flush=True)
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "world": world,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "shape": shape.name, "batch": shape.batch, "seq": shape.seq,
            "gradient_checkpointing": args.gradient_checkpointing, "keep_gathered": args.keep_gathered}  # fmt: skip
    if rank == 0:
        print(markdown(meta, rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
