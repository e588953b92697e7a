"""Attach / detach / swap on a live Llama-8B-shaped model, against PEFT's LoRA hot-swap and a reload.

Random-init bf16 model on the GPU; two seeded adapters over all linear layers at 0.1 %. Prints one
table (medians): attach and swap from Adapter objects (verified on every call), and swaps between
staged adapters (verified once when staged, values and int32 offsets resident on the GPU); and
checks the base is bit-exact after many swaps of each kind.

    python scripts/bench_live.py              # the H200 table
    python scripts/bench_live.py --tiny       # a smoke run on any machine
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time

import torch
import transformers

import spra_tools
from spra_tools import ops
from spra_tools.adapter import Adapter, TensorDelta
from spra_tools.dtypes import bit_view
from spra_tools.fingerprint import fingerprints
from spra_tools.support import SeededSupport
from spra_tools.targets import select

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)  # fmt: skip
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000)  # fmt: skip


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_adapter(model, names, seed, density) -> Adapter:
    params = dict(model.named_parameters())
    deltas = {}
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        w = params[name].data
        s = SeededSupport(seed, name, w.numel(), density)
        base = ops.gather(w, ops.support_indices(s, w.device))
        values = (torch.randn(s.count, generator=gen) * 1e-3).to(torch.bfloat16)
        deltas[name] = TensorDelta(name, tuple(w.shape), w.dtype, s, values, fingerprints(base.cpu()))
    return Adapter(deltas)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--swaps", type=int, default=1000)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = transformers.LlamaConfig(**(TINY if args.tiny else LLAMA_8B))
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    names = select(((n, "BF16", tuple(p.shape)) for n, p in model.named_parameters()), ["all-linear"])
    a = make_adapter(model, names, 1, args.density)
    b = make_adapter(model, names, 2, args.density)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n in a.deltas}
    rows = []

    # attach + detach, and detach's kernels alone below: attach is about their difference.
    rows.append(
        (
            "spra attach + detach (verify fingerprints + apply, restore)",
            timed(lambda: spra_tools.attach(model, a).detach(), args.repeat),
        )
    )
    h = spra_tools.attach(model, a)
    rows.append(
        (
            "spra detach + re-attach, kernels only (no verification)",
            timed(lambda: (h._restore(), h._apply()), args.repeat),
        )
    )
    state = {"h": h, "n": 0}

    def swap():
        state["h"] = spra_tools.swap(state["h"], b if state["h"].adapter is a else a)
        state["n"] += 1

    rows.append(("spra swap (verify new + detach old + attach new)", timed(swap, args.repeat)))
    # Exactness: keep swapping (up to --swaps, or one minute), then detach and compare the base.
    t_end = time.perf_counter() + 60
    while state["n"] < args.swaps and time.perf_counter() < t_end:
        swap()
    state["h"].detach()
    swaps = state["n"]
    exact = all(torch.equal(bit_view(p), bit_view(base[n])) for n, p in model.named_parameters() if n in base)

    # Staged: verified once; swaps between them do no verification and no host transfer.
    rows.append(
        (
            "spra stage (verify + regenerate indices onto the GPU, once per adapter)",
            timed(lambda: spra_tools.stage(model, a), 3),
        )
    )
    staged = {"a": spra_tools.stage(model, a), "b": spra_tools.stage(model, b)}
    h = spra_tools.attach(model, staged["a"])
    rows.append(("staged detach + re-attach, kernels only", timed(lambda: (h._restore(), h._apply()), args.repeat)))
    state = {"h": h, "n": 0, "next": "b"}

    def staged_swap():
        state["h"] = spra_tools.swap(state["h"], staged[state["next"]])
        state["next"] = "a" if state["next"] == "b" else "b"
        state["n"] += 1

    rows.append(("spra swap between staged adapters (restore old + apply new)", timed(staged_swap, args.repeat)))
    t_end = time.perf_counter() + 30
    while state["n"] < args.swaps and time.perf_counter() < t_end:
        staged_swap()
    state["h"].detach()
    staged_exact = all(
        torch.equal(p.detach().view(torch.int16), base[n].view(torch.int16))
        for n, p in model.named_parameters()
        if n in base
    )
    staged_swaps = state["n"]

    # Reloading: the adapted weights copied back from host memory (a lower bound on reloading the model).
    host = {n: t.cpu() for n, t in base.items()}
    params = dict(model.named_parameters())
    rows.append(
        (
            "reload the adapted weights from host memory",
            timed(lambda: [params[n].data.copy_(t, non_blocking=True) for n, t in host.items()], 3),
        )
    )

    try:
        import peft
        from peft.utils.hotswap import hotswap_adapter

        count = a.num_values
        per_rank = sum(sum(params[n].shape) for n in names)
        rank = max(1, round(count / per_rank))
        lcfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
        with tempfile.TemporaryDirectory() as tmp:
            pm = peft.get_peft_model(model, lcfg)
            pm.save_pretrained(f"{tmp}/a")
            for m in pm.modules():
                if hasattr(m, "lora_B"):
                    for p in m.lora_B.values():
                        torch.nn.init.normal_(p.weight, std=1e-3)
            pm.save_pretrained(f"{tmp}/b")
            paths = [f"{tmp}/a", f"{tmp}/b"]
            flip = {"i": 0}

            def lora_swap():
                flip["i"] ^= 1
                hotswap_adapter(pm, paths[flip["i"]], adapter_name="default", torch_device=device)

            rows.append(
                (f"PEFT LoRA hot-swap, r={rank} all-linear ({rank * per_rank:,} params)", timed(lora_swap, args.repeat))
            )
    except Exception as e:  # peft missing or its API changed: say so in the table
        rows.append((f"PEFT LoRA hot-swap: not measured ({e.__class__.__name__}: {str(e)[:80]})", float("nan")))

    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(
        f"# bench_live — {datetime.date.today()}, {gpu}, torch {torch.__version__}, backend {ops.backend_for(device)}"
    )
    print(
        f"{'tiny' if args.tiny else 'Llama-8B'} shape, all linears ({len(names)} tensors), density {args.density:g}: {a.num_values:,} values per adapter\n"
    )
    print("| what | median |\n|---|---|")
    for what, t in rows:
        print(f"| {what} | {t * 1e3:.2f} ms |")
    print(f"\nbase bit-exact after {swaps} swaps and a final detach: {exact}")
    print(f"base bit-exact after {staged_swaps} staged swaps and a final detach: {staged_exact}")
    held = staged["a"].nbytes
    print(f"a staged adapter holds {held / 2**20:.1f} MiB on the device ({held / a.num_values:.1f} bytes per value)")


if __name__ == "__main__":
    main()
