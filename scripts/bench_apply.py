"""Attach a seeded adapter to a Llama-8B-shaped model in place, against the per-tensor anchors.

One table, everything measured in the same run (medians): our one-launch attach, which regenerates
every support from the seed and saves the originals for an exact detach, against a per-tensor
`index_add_` loop with precomputed indices and peft-sparta's advanced-index read-modify-write
(`W[rows, cols] = W[rows, cols] + delta`). Random bf16 weights on the device; all linear layers
at 0.1 %. On CPU it also times regenerating all supports (compiled, one call) against the numpy spec.

    python scripts/bench_apply.py --device cuda            # the H200 table
    python scripts/bench_apply.py --device cpu             # a 2-core machine (4 layers: memory)
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
from llama8b import linear_shapes  # noqa: E402  (scripts/ is on sys.path)

from spra_tools import ops
from spra_tools.support import SeededSupport, as_int64, tensor_key


def timed(fn, device, repeat: int) -> float:
    """Median seconds of fn() over `repeat` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, help="default: 32 on CUDA, 4 on CPU (memory)")
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    device = args.device
    args.layers = args.layers or (32 if device == "cuda" else 4)
    backend = ops.backend_for(device)
    gen = torch.Generator(device=device).manual_seed(0)

    names, weights, supports = [], [], []
    for name, shape in linear_shapes(args.layers):
        w = torch.empty(shape, dtype=torch.bfloat16, device=device)
        w.normal_(generator=gen) if device == "cuda" else w.zero_()  # CPU: random content costs minutes
        names.append(name)
        weights.append(w)
        supports.append(SeededSupport(1234, name, w.numel(), args.density))
    count = sum(s.count for s in supports)
    values = (torch.randn(count, generator=gen, device=device) * 1e-3).to(torch.bfloat16)
    splits = [s.count for s in supports]
    per_tensor_values = list(values.split(splits))
    indices = [ops.support_indices(s, device) for s in supports]  # the anchors get these for free
    coords = [torch.stack([i // w.shape[1], i % w.shape[1]], 1) for i, w in zip(indices, weights)]

    rows = []

    # Repeated attaches keep adding the (tiny) values: the timing is what matters here. Detach is
    # timed restoring one saved set of originals, which is idempotent.
    t_attach = timed(lambda: ops.apply_seeded(weights, supports, values), device, args.repeat)
    originals = ops.apply_seeded(weights, supports, values)
    t_detach = timed(lambda: ops.restore_seeded(weights, supports, originals), device, args.repeat)

    def index_add_loop():
        for w, i, v in zip(weights, indices, per_tensor_values):
            w.view(-1).index_add_(0, i, v)

    def advanced_index():
        for w, c, v in zip(weights, coords, per_tensor_values):
            w[c[:, 0], c[:, 1]] = w[c[:, 0], c[:, 1]] + v

    t_index_add = timed(index_add_loop, device, args.repeat)
    t_advanced = timed(advanced_index, device, max(5, args.repeat // 5))

    keys = [as_int64(tensor_key(s.seed, s.name)) for s in supports]
    numels = [s.numel for s in supports]
    dens = [s.density for s in supports]

    def regenerate():
        torch.ops.spra_tools.seeded_indices(torch.empty(0, device=device), keys, numels, dens)

    t_regen = timed(regenerate, device, max(5, args.repeat // 5))
    rows.append(("attach (regenerate supports + apply + save originals), one launch", t_attach))
    rows.append(("detach (regenerate supports + restore originals), one launch", t_detach))
    rows.append(("regenerate all supports alone (seeded_indices, one launch)", t_regen))
    rows.append(("anchor: per-tensor index_add_ loop, precomputed indices", t_index_add))
    rows.append(("anchor: peft-sparta advanced-index read-modify-write", t_advanced))
    if device == "cpu":
        t_numpy = timed(lambda: [s.indices() for s in supports], device, 3)
        rows.append(("regenerate all supports with the numpy spec", t_numpy))

    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"# bench_apply — {datetime.date.today()}, {gpu}, torch {torch.__version__}, backend {backend}")
    print(
        f"Llama-8B shape, {args.layers} layers, all linears ({len(weights)} tensors, "
        f"{sum(w.numel() for w in weights) / 1e9:.2f} B weights, bf16), density {args.density:g}: {count:,} values\n"
    )
    print("| what | median | vs attach |")
    print("|---|---|---|")
    for what, t in rows:
        print(f"| {what} | {t * 1e3:.3f} ms | {t / t_attach:.1f}x |")
    if device == "cuda":
        bw = 4.8e12  # H200 HBM3e, bytes/s
        ideal = count * (2 + 2 + 2 + 2)  # value in, weight in, weight out, original out
        sectors = count * (2 + 2 + 32 + 32)  # each random weight access moves a 32-byte sector
        print(
            f"\nphysical floor at {bw / 1e12:.1f} TB/s: {ideal / bw * 1e3:.3f} ms (bytes touched) /"
            f" {sectors / bw * 1e3:.3f} ms (32-byte sectors for random weight access)"
        )


if __name__ == "__main__":
    main()
