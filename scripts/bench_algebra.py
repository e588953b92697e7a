"""Merge 8 Llama-8B-shaped seeded adapters: load all 8 + merge_adapters(sum) + save, against the targets.

The adapters cover every linear layer of Llama-3-8B (32 layers x q,k,v,o,gate,up,down) at 0.1 %,
all with one seed and density, random bf16 values. No base is read: the fingerprints are dummy
strings of 16 hex digits (a merge of shared seeded supports reuses them and never needs the base).
The timed part runs in a fresh process pinned to 2 cores, so its peak RSS (getrusage) counts only
load + merge + save, not building the inputs.

    python scripts/bench_algebra.py            # targets: <= 5 s, <= 2 GB on 2 cores
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llama8b import LAYERS, linear_shapes  # noqa: E402  (scripts/ is on sys.path)

INPUTS, DENSITY, SEED = 8, 0.001, 7
TARGET_S, TARGET_GB = 5.0, 2.0


def build(folder: Path, layers: int) -> list[Path]:
    import torch

    from spra_tools.adapter import Adapter, TensorDelta
    from spra_tools.support import SeededSupport

    numel = sum(r * c for _, (r, c) in linear_shapes(layers))
    gen = torch.Generator().manual_seed(0)
    paths = []
    for k in range(INPUTS):
        deltas = {}
        for j, (name, shape) in enumerate(linear_shapes(layers)):
            support = SeededSupport(SEED, name, shape[0] * shape[1], DENSITY)
            values = (torch.randn(support.count, generator=gen) * 1e-3).to(torch.bfloat16)
            fp = {"BF16": f"{j:016x}"}  # dummy: no base is read
            deltas[name] = TensorDelta(name, shape, torch.bfloat16, support, values, fp)
        adapter = Adapter(deltas, {}, {"name": "llama-8b-shape", "numel": numel}, {}, {"method": "bench"})
        paths.append(folder / f"a{k}.spra")
        adapter.save(paths[-1], overwrite=True)
    return paths


def measure(folder: Path) -> None:
    """Child process: time load + merge + save; print 'seconds load merge save values rss_bytes'."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
    import torch

    torch.set_num_threads(2)
    from spra_tools.adapter import Adapter
    from spra_tools.algebra.merge import merge_adapters

    paths = sorted(folder.glob("a*.spra"))
    t0 = time.perf_counter()
    adapters = [Adapter.load(p) for p in paths]
    t1 = time.perf_counter()
    merged, report = merge_adapters(adapters, method="sum", names=[str(p) for p in paths])
    t2 = time.perf_counter()
    merged.save(folder / "merged.spra", overwrite=True)
    t3 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(t3 - t0, t1 - t0, t2 - t1, t3 - t2, merged.num_values, rss)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        paths = build(folder, args.layers)
        built = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in paths)
        out = subprocess.run(
            [sys.executable, __file__, "--measure", str(folder)], check=True, capture_output=True, text=True
        ).stdout.split()
        total, load, merge, save, values, rss = (float(x) for x in out)
        merged_size = (folder / "merged.spra").stat().st_size
    print(
        f"{INPUTS} adapters x {args.layers * 7} tensors at {DENSITY:.1%}, seeded (one seed): "
        f"{values / 1e6:.2f} M values each, {size / INPUTS / 1e6:.1f} MB per file, "
        f"merged {merged_size / 1e6:.1f} MB (inputs built in {built:.1f} s)"
    )
    print(f"{'step':<24}{'seconds':>10}")
    for step, secs in (("load x8", load), ("merge_adapters(sum)", merge), ("save", save)):
        print(f"{step:<24}{secs:>10.3f}")
    ok_s, ok_m = total <= TARGET_S, rss <= TARGET_GB * 1e9
    print(f"{'total':<24}{total:>10.3f}   target <= {TARGET_S:.0f} s   {'ok' if ok_s else 'MISSED'}")
    print(f"{'peak RSS (GB)':<24}{rss / 1e9:>10.3f}   target <= {TARGET_GB:.0f} GB  {'ok' if ok_m else 'MISSED'}")


if __name__ == "__main__":
    main()
