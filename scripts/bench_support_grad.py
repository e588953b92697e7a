"""Weight gradients at the support: the sampled kernel (SDDMM) vs dense ``dYᵀX`` + gather vs
``torch.sparse.sampled_addmm``, and the crossover `ops.sddmm_is_faster` is fitted from.

    python scripts/bench_support_grad.py            # the micro-table (14336x4096, 0.1 % / 1 %, 512..8192 tokens)
    python scripts/bench_support_grad.py --sweep    # + shapes x densities at 2048 tokens, and the fit

All inputs bf16, random; each method's output is checked against the fp64 reference first.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from spra_tools import ops


def timed(fn, reps: int = 20) -> float:
    """Median milliseconds of fn() on the GPU."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def case(rows: int, cols: int, density: float, tokens: int, sampled_addmm: bool) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    dy = torch.randn(tokens, rows, device="cuda", generator=gen).bfloat16()
    x = torch.randn(tokens, cols, device="cuda", generator=gen).bfloat16()
    k = int(rows * cols * density)
    idx = torch.randperm(rows * cols, device="cuda", generator=gen)[:k].sort().values
    want = (dy.double().t() @ x.double()).view(-1)[idx]
    row = {"rows": rows, "cols": cols, "density": density, "tokens": tokens, "k": k}
    for method in ("sddmm", "dense"):
        got = ops.support_grad(dy, x, idx, method)
        err = float((got.double() - want).norm() / want.norm())
        assert err < 1e-5, (method, err)
        row[method] = timed(lambda m=method: ops.support_grad(dy, x, idx, m))
    if sampled_addmm:
        crow = torch.searchsorted(idx // cols, torch.arange(rows + 1, device="cuda"))
        mask = torch.sparse_csr_tensor(crow, idx % cols, torch.zeros(k, device="cuda"), (rows, cols))
        try:
            a, b = dy.t().float(), x.float()  # sampled_addmm has no bf16 kernel with fp32 accumulation
            row["sampled_addmm"] = timed(lambda: torch.sparse.sampled_addmm(mask, a, b), reps=5)
        except RuntimeError as e:
            row["sampled_addmm"] = f"n/a ({str(e).splitlines()[0][:60]})"
    row["auto"] = "sddmm" if ops.sddmm_is_faster(k, rows, cols, tokens) else "dense"
    row["best"] = "sddmm" if row["sddmm"] < row["dense"] else "dense"
    return row


def fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also shapes x densities at 2048 tokens, and the fit")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    assert ops.backend_for("cuda") == "cuda", "needs the CUDA extension"

    rows = []
    print(
        "| shape | density | tokens | k | SDDMM ms | dense+gather ms | sampled_addmm (fp32) ms | auto picks | faster |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for density in (0.001, 0.01):
        for tokens in (512, 2048, 8192):
            r = case(14336, 4096, density, tokens, sampled_addmm=True)
            rows.append(r)
            print(f"| 14336x4096 | {density:.1%} | {tokens} | {r['k']:,} | {fmt(r['sddmm'])} | {fmt(r['dense'])} | "
                  f"{fmt(r['sampled_addmm'])} | {r['auto']} | {r['best']} |")  # fmt: skip
    if args.sweep:
        print("\n| shape | density | tokens | SDDMM ms | dense ms | auto | faster |")
        print("|---|---|---|---|---|---|---|")
        for shape in ((1024, 4096), (4096, 4096), (14336, 4096), (4096, 14336)):
            for density in (0.001, 0.003, 0.01, 0.03, 0.1):
                r = case(*shape, density, 2048, sampled_addmm=False)
                rows.append(r)
                print(f"| {shape[0]}x{shape[1]} | {density:.1%} | 2048 | {fmt(r['sddmm'])} | {fmt(r['dense'])} | "
                      f"{r['auto']} | {r['best']} |")  # fmt: skip
        # Least-squares fit of the cost model behind ops.sddmm_is_faster.
        sd = [(r["k"] * r["tokens"], r["sddmm"]) for r in rows]
        ns_per_mac = sum(m * t for m, t in sd) / sum(m * m for m, _ in sd) * 1e6
        dn = [(r["rows"] * r["cols"] * r["tokens"], r["dense"]) for r in rows]
        dense_ns = sum(m * t for m, t in dn) / sum(m * m for m, _ in dn) * 1e6
        print(f"\nfit: SDDMM_NS_PER_MAC ~ {ns_per_mac:.2e}, DENSE_NS_PER_MAC ~ {dense_ns:.2e}")
        wrong = [r for r in rows if r["auto"] != r["best"]]
        print(f"auto picked the slower method in {len(wrong)} of {len(rows)} cases")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
