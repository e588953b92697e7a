"""Serving many adapters from one base: MultiAdapter's mixed batches against the base model, one adapter
attached in place, and PEFT's LoRA mixed batches (`adapter_names=`), all eager, in one run.

Random-init bf16 Llama-8B shape on the GPU; seeded adapters over every linear layer at 0.1 %
(6,979,264 values each). Batch of 32 sequences: prefill of 512 tokens each (tokens/s over the 16,384
prompt tokens, last-token logits as `generate` computes them), then decode, one new token per
sequence per step on a KV cache holding 512 tokens and the steps taken so far. Rows with 1, 8 and
32 distinct adapters in the batch (row i uses adapter i mod k). PEFT anchors: LoRA r16 on V,O
(6,815,744 parameters: the same count) and r3 on all linear layers (7,864,320: the same layers).
Then the memory per resident adapter, how many fit beside the base, and a load of --resident
adapters to show it. Prints one Markdown table (and notes under it).

    python scripts/bench_serve.py             # the H200 table (about 4 minutes)
    python scripts/bench_serve.py --tiny      # a smoke run on any machine
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import time

import peft
import torch
import transformers
from llama8b import HIDDEN, INTERMEDIATE, KV, LAYERS  # noqa: E402  (scripts/ is on sys.path)

import spra_tools
from spra_tools import ops
from spra_tools.adapter import Adapter, TensorDelta, dtype_name
from spra_tools.fingerprint import fingerprint_many
from spra_tools.multi import MultiAdapter
from spra_tools.support import SeededSupport
from spra_tools.targets import select

HEAD_DIM = 128
LLAMA_8B = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                num_attention_heads=HIDDEN // HEAD_DIM, num_key_value_heads=KV // HEAD_DIM, vocab_size=128256)  # fmt: skip
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000)  # fmt: skip
LORA = {"LoRA r16 V,O": (16, ["v_proj", "o_proj"]), "LoRA r3 all-linear": (3, "all-linear")}
MB = 1e6


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_adapters(model, count: int, density: float) -> list[Adapter]:
    """Seeded all-linear adapters with small random bf16 values, fingerprinted on the device."""
    params = dict(model.named_parameters())
    names = select(((n, "BF16", tuple(p.shape)) for n, p in params.items()), ["all-linear"])
    weights = [params[n].data for n in names]
    out = []
    for seed in range(count):
        supports = [SeededSupport(seed, n, w.numel(), density) for n, w in zip(names, weights)]
        base = ops.gather_seeded(weights, supports)
        fps = fingerprint_many(base, [s.count for s in supports])
        gen = torch.Generator(device=base.device).manual_seed(seed)
        values = (torch.randn(base.numel(), generator=gen, device=base.device) * 1e-3).to(torch.bfloat16).cpu()
        deltas, offset = {}, 0
        for n, w, s, fp in zip(names, weights, supports, fps):
            v = values[offset : offset + s.count]
            offset += s.count
            deltas[n] = TensorDelta(n, tuple(w.shape), w.dtype, s, v, {dtype_name(w.dtype): fp})
        out.append(Adapter(deltas))
    return out


def named(model, names):
    """A call of `model` (a MultiAdapter or a PEFT model) with these adapter_names."""
    return lambda **kw: model(**kw, adapter_names=names)


def measure(call, prompt, decode_steps: int, prefills: int = 2) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s): median prefill; median decode step after the last prefill."""

    def prefill():
        out = call(input_ids=prompt, use_cache=True, logits_to_keep=1)
        return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    with torch.no_grad():
        cache, token = prefill()  # warm-up (and a first decode below)
        call(input_ids=token, past_key_values=cache, use_cache=True)
        times = []
        for _ in range(prefills):
            del cache
            sync()
            t0 = time.perf_counter()
            cache, token = prefill()
            sync()
            times.append(time.perf_counter() - t0)
        steps = []
        for i in range(decode_steps + 2):
            sync()
            t0 = time.perf_counter()
            token = call(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            sync()
            if i >= 2:
                steps.append(time.perf_counter() - t0)
    rows = prompt.shape[0]
    return prompt.numel() / statistics.median(times), rows / statistics.median(steps)


def kernel_share(call, prompt) -> tuple[float, float]:
    """GPU time of the sparse kernels and of all kernels in one decode step (ms), from the profiler."""
    with torch.no_grad():
        out = call(input_ids=prompt, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        call(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            call(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            sync()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) / 1e3
    sparse = sum(e.self_device_time_total for e in events if "sparse_addmm" in e.key) / 1e3
    return sparse, total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a small model: a smoke run on any machine")
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10, help="timed decode steps per row (PEFT: a third)")
    ap.add_argument("--resident", type=int, default=1000, help="adapters to load at the end (0: skip)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = transformers.LlamaConfig(**(TINY if args.tiny else LLAMA_8B), attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    distinct = [k for k in (1, 8, 32) if k <= args.batch]
    adapters = make_adapters(model, max(distinct), args.density)
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.context), device=device)
    rows = []  # (what, distinct adapters, prefill tok/s, decode tok/s)

    def row(what, k, call, steps=args.steps):
        prefill, decode = measure(call, prompt, steps)
        rows.append((what, k, prefill, decode))
        gc.collect()

    row("base model", 0, model)
    with spra_tools.attached(model, adapters[0]):
        row("base + 1 adapter attached in place", 1, model)

    shares = {}
    for regenerate in (False, True):
        ma = MultiAdapter(model, regenerate_supports=regenerate)
        for i, a in enumerate(adapters):
            ma.load(f"a{i}", a)
        label = "MultiAdapter, supports regenerated" if regenerate else "MultiAdapter"
        for k in distinct:
            names = [f"a{i % k}" for i in range(args.batch)]
            row(label, k, named(ma, names))
        if device == "cuda":
            shares[label] = kernel_share(named(ma, [f"a{i % max(distinct)}" for i in range(args.batch)]), prompt)
        shares[label + " bytes"] = ma.resident_bytes("a0")
        ma.close()

    lora_params = {}
    for label, (rank, targets) in LORA.items():
        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
        pm = peft.get_peft_model(model, cfg, adapter_name="l0")
        for i in range(1, max(distinct)):
            pm.add_adapter(f"l{i}", cfg)
        pm.eval()
        lora_params[label] = sum(p.numel() for n, p in pm.named_parameters() if ".l0." in n)
        for k in distinct:
            names = [f"l{i % k}" for i in range(args.batch)]
            row(f"PEFT {label}, mixed batch", k, named(pm, names), steps=max(2, args.steps // 3))
        model = pm.unload()

    base_prefill, base_decode = rows[0][2], rows[0][3]
    print(f"\n{datetime.date.today()}, {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"{'tiny' if args.tiny else 'Llama-8B shape'} bf16, batch {args.batch}, context {args.context}, "
          f"adapters of {sum(d.count for d in adapters[0].deltas.values()):,} values; "
          f"eager\n")  # fmt: skip
    print("| what | distinct adapters | decode tokens/s | × base | prefill tokens/s | × base |")
    print("|---|---|---|---|---|---|")
    for what, k, prefill, decode in rows:
        print(f"| {what} | {k or '-'} | {decode:,.0f} | {decode / base_decode:.2f} | {prefill:,.0f} | "
              f"{prefill / base_prefill:.2f} |")  # fmt: skip
    print()
    for label, params in lora_params.items():
        print(f"- PEFT {label}: {params:,} parameters per adapter, {params * 2 / MB:.1f} MB in bf16.")
    for label in ("MultiAdapter", "MultiAdapter, supports regenerated"):
        if label in shares:
            sparse, total = shares[label]
            print(f"- {label}, {max(distinct)} adapters: the sparse kernels take {sparse:.2f} ms of "
                  f"{total:.2f} ms GPU time in one decode step.")  # fmt: skip
    resident(model, adapters, args, shares, weights_bytes, device)


def resident(model, adapters, args, shares, weights_bytes, device):
    """Memory per resident adapter, how many fit beside the base, and a load of args.resident."""
    stored, regenerated = shares["MultiAdapter bytes"], shares["MultiAdapter, supports regenerated bytes"]
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        room = total - weights_bytes - 8 * 2**30  # 8 GiB kept for the KV cache and activations
        print(f"- Resident per adapter: {stored / MB:.1f} MB with stored offsets, {regenerated / MB:.1f} MB with "
              f"supports regenerated; beside the {weights_bytes / 2**30:.1f} GiB base with 8 GiB kept free, "
              f"{room // stored:,} or {room // regenerated:,} fit on this {total / 2**30:.0f} GiB device.")  # fmt: skip
    if not args.resident:
        return
    ma = MultiAdapter(model)
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    t0 = time.perf_counter()
    for i in range(args.resident):
        ma.load(f"r{i}", adapters[i % len(adapters)])
    sync()
    seconds = time.perf_counter() - t0
    held = (torch.cuda.memory_allocated() - before) if device == "cuda" else ma.resident_bytes()
    names = [f"r{(i * args.resident) // args.batch}" for i in range(args.batch)]  # spread over the pool
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, 8), device=device)
    logits = ma(input_ids=prompt, adapter_names=names).logits
    ok = bool(torch.isfinite(logits).all())
    print(f"- Loaded {args.resident:,} adapters in {seconds:.1f} s ({seconds / args.resident * 1e3:.0f} ms each, "
          f"verified); the pool holds {held / 2**30:.1f} GiB ({ma.resident_bytes() / 2**30:.1f} GiB in use); "
          f"a batch over {args.batch} of them ran {'with finite logits' if ok else 'WITH NON-FINITE LOGITS'}.")  # fmt: skip


if __name__ == "__main__":
    main()
