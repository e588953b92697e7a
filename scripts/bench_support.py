"""Time regenerating every seeded support of a Llama-8B shape (all linear layers) from the seed.

Shapes only: no weights are allocated. Prints one table; run with any Python that has spra-tools.

    python scripts/bench_support.py [--density 0.001] [--repeat 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
from llama8b import linear_shapes  # noqa: E402  (scripts/ is on sys.path)

from spra_tools import ops
from spra_tools.support import SeededSupport


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    supports = [SeededSupport(args.seed, n, r * c, args.density) for n, (r, c) in linear_shapes()]
    count = sum(s.count for s in supports)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        for s in supports:
            ops.support_indices(s, args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best = min(times)
    print(f"| shape | tensors | density | indices | device | backend | best of {args.repeat} | indices/s |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| Llama-8B all-linear | {len(supports)} | {args.density:g} | {count:,} | {args.device} "
        f"| {ops.backend_for(args.device)} | {best:.3f} s | {count / best / 1e6:.1f} M |"
    )


if __name__ == "__main__":
    main()
