"""Attach a seeded adapter to a Llama-8B-shaped model in place, against generic-op ceilings and per-tensor anchors.

One table per density, everything in it measured in the same run (medians):

* ours — attach (regenerate every support from its seed, apply, save the originals; one launch),
  detach (regenerate, write the originals back), gather (what verification reads); the same with
  the supports given as int32 offsets (what a staged adapter holds; the *_many ops, one launch);
  attach in two launches (regenerate the indices into memory, then apply with them); regenerating
  the supports alone;
* ceilings — one flat bf16 buffer of the same total size with as many sorted random indices (one
  uniform pick in each of `count` equal strata, like a seeded support), through generic torch ops:
  index_select; index_copy_; index_select + fp32 add + index_copy_; index_add_;
* anchors — a per-tensor index_add_ loop with precomputed indices; peft-sparta's advanced-index
  read-modify-write (`W[rows, cols] = W[rows, cols] + delta`).

Each of our rows is divided by the ceiling that does the same memory work: attach by the best
read-modify-write composite (index_add_, or select + add + copy), detach by index_copy_ (write
only), gather by index_select. Random bf16 weights on the device; all linear layers.

    python scripts/bench_apply.py --device cuda                    # the H200 tables, 0.1 % and 1 %
    python scripts/bench_apply.py --device cuda --profile          # each kernel once, for Nsight Compute
    python scripts/bench_apply.py --device cpu                     # a 2-core machine (4 layers: memory)
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


def sorted_random_indices(count: int, n: int, gen: torch.Generator, device) -> torch.Tensor:
    """`count` sorted int64 indices in [0, n): one uniform pick in each of `count` equal strata."""
    u = torch.rand(count, generator=gen, dtype=torch.float64, device=device)
    return ((torch.arange(count, dtype=torch.float64, device=device) + u) * (n / count)).long().clamp_(max=n - 1)


class Setup:
    """The model's weights (built once) and, per density, its supports, values and index forms."""

    def __init__(self, device: str, layers: int):
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.names, self.weights = [], []
        for name, shape in linear_shapes(layers):
            w = torch.empty(shape, dtype=torch.bfloat16, device=device)
            w.normal_(generator=self.gen) if device == "cuda" else w.zero_()  # CPU: random content costs minutes
            self.names.append(name)
            self.weights.append(w)
        self.numel = sum(w.numel() for w in self.weights)

    def at(self, density: float) -> None:
        self.density = density
        self.supports = [SeededSupport(1234, n, w.numel(), density) for n, w in zip(self.names, self.weights)]
        self.counts = [s.count for s in self.supports]
        self.count = sum(self.counts)
        self.values = (torch.randn(self.count, generator=self.gen, device=self.device) * 1e-3).to(torch.bfloat16)
        self.indices = ops.indices_many(self.supports, self.device)  # int64, all tensors
        self.offsets = self.indices.to(torch.int32)  # every numel here is below 2**31


def our_rows(s: Setup, repeat: int) -> dict[str, float]:
    """Our kernels at the current density: name -> median seconds."""
    w, sup, d = s.weights, s.supports, s.device
    out = {"attach": timed(lambda: ops.apply_seeded(w, sup, s.values), d, repeat)}
    originals = ops.apply_seeded(w, sup, s.values)
    # Detach restores one saved set of originals, which is idempotent.
    out["detach"] = timed(lambda: ops.restore_seeded(w, sup, originals), d, repeat)
    out["gather"] = timed(lambda: ops.gather_seeded(w, sup), d, repeat)
    out["staged attach"] = timed(lambda: ops.scatter_apply_many(w, s.offsets, s.counts, s.values), d, repeat)
    staged_originals = ops.scatter_apply_many(w, s.offsets, s.counts, s.values)
    out["staged detach"] = timed(lambda: ops.restore_many(w, s.offsets, s.counts, staged_originals), d, repeat)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, help="default: 32 on CUDA, 4 on CPU (memory)")
    ap.add_argument("--density", type=float, nargs="+", default=[0.001, 0.01])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--profile", action="store_true", help="run each kernel once (first density), for a profiler")
    args = ap.parse_args()
    device = args.device
    args.layers = args.layers or (32 if device == "cuda" else 4)
    backend = ops.backend_for(device)
    s = Setup(device, args.layers)
    if args.profile:
        return profile(s, args.density[0])
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"# bench_apply — {datetime.date.today()}, {gpu}, torch {torch.__version__}, backend {backend}")
    for density in args.density:
        s.at(density)
        table(s, args.repeat)
        del s.values, s.indices, s.offsets
        if device == "cuda":
            torch.cuda.empty_cache()


def table(s: Setup, repeat: int) -> None:
    device, w = s.device, s.weights
    ours = our_rows(s, repeat)
    keys = [as_int64(tensor_key(x.seed, x.name)) for x in s.supports]
    numels = [x.numel for x in s.supports]
    dens = [x.density for x in s.supports]

    def regenerate():
        return torch.ops.spra_tools.seeded_indices(torch.empty(0, device=device), keys, numels, dens)

    t_two = timed(lambda: ops.scatter_apply_many(w, regenerate(), s.counts, s.values), device, repeat)
    t_regen = timed(regenerate, device, repeat)

    ceiling = ceilings(s, repeat)
    t_select, t_copy, t_rmw, t_add = (ceiling[k] for k in ("select", "copy", "rmw", "add"))
    best_rmw = min(t_rmw, t_add)
    t_loop, t_advanced = anchors(s, repeat)

    rmw_name, copy_name, select_name = "best read-modify-write", "index_copy_", "index_select"
    rows = [
        ("attach: regenerate + apply + save originals, one launch", ours["attach"], rmw_name, best_rmw),
        ("detach: regenerate + restore originals, one launch", ours["detach"], copy_name, t_copy),
        ("gather at the supports (verification's read), one launch", ours["gather"], select_name, t_select),
        ("attach, int32 offsets given (a staged adapter), one launch", ours["staged attach"], rmw_name, best_rmw),
        ("detach, int32 offsets given (a staged adapter), one launch", ours["staged detach"], copy_name, t_copy),
        ("attach in two launches: seeded_indices, then apply with them", t_two, rmw_name, best_rmw),
        ("regenerate all supports alone (seeded_indices, one launch)", t_regen, None, None),
        ("ceiling: flat buffer index_select", t_select, None, None),
        ("ceiling: flat buffer index_copy_", t_copy, None, None),
        ("ceiling: flat buffer index_select + fp32 add + index_copy_", t_rmw, None, None),
        ("ceiling: flat buffer index_add_ (bf16)", t_add, None, None),
        ("anchor: per-tensor index_add_ loop, precomputed indices", t_loop, rmw_name, best_rmw),
        ("anchor: peft-sparta advanced-index read-modify-write", t_advanced, rmw_name, best_rmw),
    ]
    if device == "cpu":
        rows.append(
            (
                "regenerate all supports with the numpy spec",
                timed(lambda: [x.indices() for x in s.supports], device, 3),
                None,
                None,
            )
        )

    print(
        f"\nLlama-8B shape, {len(w) // 7} layers, all linears ({len(w)} tensors, {s.numel / 1e9:.2f} B weights, bf16), "
        f"density {s.density:g}: {s.count:,} values; ceilings on one flat buffer of {s.numel / 1e9:.2f} B bf16 "
        f"with {s.count:,} sorted random indices\n"
    )
    print("| what | median | ceiling | / ceiling |")
    print("|---|---|---|---|")
    for what, t, ceiling, t_ceiling in rows:
        ratio = f"{t / t_ceiling:.2f}" if t_ceiling else "—"
        print(f"| {what} | {t * 1e3:.3f} ms | {ceiling or '—'} | {ratio} |")
    print(
        f"\nattach: speed-up over the per-tensor index_add_ loop {t_loop / ours['attach']:.2f}x; time / the best "
        f"generic read-modify-write {ours['attach'] / best_rmw:.2f} ("
        f"{'index_add_' if t_add <= t_rmw else 'select + add + copy'}); "
        f"detach time / index_copy_ {ours['detach'] / t_copy:.2f}"
    )
    if device == "cuda":
        bw = 4.8e12  # H200 HBM3e, bytes/s
        ideal = s.count * (2 + 2 + 2 + 2)  # value in, weight in, weight out, original out
        sectors = s.count * (2 + 2 + 32 + 32)  # each random weight access moves a 32-byte sector
        print(
            f"physical floor at {bw / 1e12:.1f} TB/s: {ideal / bw * 1e3:.3f} ms (bytes touched) /"
            f" {sectors / bw * 1e3:.3f} ms (32-byte sectors for random weight access)"
        )


def ceilings(s: Setup, repeat: int) -> dict[str, float]:
    """The same number of updates on one flat buffer of the same size, by generic torch ops."""
    device = s.device
    flat = torch.empty(s.numel, dtype=torch.bfloat16, device=device)
    flat.normal_(generator=s.gen) if device == "cuda" else flat.zero_()
    idx = sorted_random_indices(s.count, s.numel, s.gen, device)
    vals = s.values

    def rmw():
        flat.index_copy_(0, idx, (flat.index_select(0, idx).float() + vals.float()).to(flat.dtype))

    return {
        "select": timed(lambda: flat.index_select(0, idx), device, repeat),
        "copy": timed(lambda: flat.index_copy_(0, idx, vals), device, repeat),
        "rmw": timed(rmw, device, repeat),
        "add": timed(lambda: flat.index_add_(0, idx, vals), device, repeat),
    }


def anchors(s: Setup, repeat: int) -> tuple[float, float]:
    """The per-tensor index_add_ loop and peft-sparta's advanced-index read-modify-write."""
    per_tensor = list(zip(s.weights, s.indices.split(s.counts), s.values.split(s.counts)))
    coords = [torch.stack([i // x.shape[1], i % x.shape[1]], 1) for x, i, _ in per_tensor]

    def index_add_loop():
        for x, i, v in per_tensor:
            x.view(-1).index_add_(0, i, v)

    def advanced_index():
        for (x, _, v), c in zip(per_tensor, coords):
            x[c[:, 0], c[:, 1]] = x[c[:, 0], c[:, 1]] + v

    return timed(index_add_loop, s.device, repeat), timed(advanced_index, s.device, max(3, repeat // 10))


def profile(s: Setup, density: float) -> None:
    """Each of our kernels once, then each flat-buffer ceiling once, inside one NVTX range "profile"
    (ncu --nvtx --nvtx-include profile/ ...): the warm-up runs outside it."""
    s.at(density)
    flat = torch.empty(s.numel, dtype=torch.bfloat16, device=s.device)
    idx = sorted_random_indices(s.count, s.numel, s.gen, s.device)
    vals, w = s.values, s.weights

    def run():
        originals = ops.apply_seeded(w, s.supports, vals)
        ops.restore_seeded(w, s.supports, originals)
        ops.gather_seeded(w, s.supports)
        staged = ops.scatter_apply_many(w, s.offsets, s.counts, vals)
        ops.restore_many(w, s.offsets, s.counts, staged)
        flat.index_select(0, idx)
        flat.index_copy_(0, idx, vals)
        flat.index_add_(0, idx, vals)

    run()
    torch.cuda.synchronize()
    with torch.cuda.nvtx.range("profile"):
        run()
    torch.cuda.synchronize()
    print(f"profiled: density {density:g}, {s.count:,} values")


if __name__ == "__main__":
    main()
