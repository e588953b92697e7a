"""Training-step benchmark: SpaRTA (ours) against the floor, PEFT LoRA, peft-sparta and a full fine-tune.

Random-init bf16 Llama model (sdpa attention) built fresh for every row, random token ids, a causal-LM
loss; one step = forward + backward + optimizer step + zero_grad (the floor: forward + backward). Each
row reports the median step time over --steps timed steps after --warmup, the peak allocated memory
from the row's start (model, optimizer state and activations), its ratio to the floor measured in the
same run, and the number of trained values. The SpaRTA budgets are LoRA r16's parameter counts on
the same layers (6.8 M on V,O and 41.9 M on all linears for the 8B shape), so every row trains
about as many values as its LoRA neighbour. Targets and results: docs/BENCHMARKS.md.

    python scripts/bench_train.py                          # the H200 table, 8B shape (2x1024)
    python scripts/bench_train.py --shape 1b 8b --json train.json
    python scripts/bench_train.py --shape tiny --steps 2 --warmup 1    # a CPU smoke run, every row
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import torch
import transformers
from llama8b import HIDDEN, INTERMEDIATE, KV, LAYERS  # noqa: E402  (scripts/ is on sys.path)

GIB = 2**30
LORA_RANK = 16


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int

    def config(self) -> transformers.LlamaConfig:
        return transformers.LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            max_position_embeddings=max(2048, self.seq),
            attn_implementation="sdpa",
            use_cache=False,
        )

    def linear_shapes(self):
        """(module suffix, [out, in]) of one decoder layer's linear weights."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        h, i = self.hidden, self.intermediate
        return [("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, h)),
                ("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))]  # fmt: skip

    def budget(self, modules) -> tuple[int, int]:
        """(LoRA r16 parameter count, base weight count) over `modules` in all layers."""
        chosen = [s for m, s in self.linear_shapes() if m in modules]
        lora = sum(LORA_RANK * (o + i) for o, i in chosen) * self.layers
        return lora, sum(o * i for o, i in chosen) * self.layers


SHAPES = {
    "8b": Shape("8b", HIDDEN, INTERMEDIATE, LAYERS, 32, KV // (HIDDEN // 32), 128256, 2, 1024),
    "1b": Shape("1b", 2048, 8192, 16, 32, 8, 128256, 4, 1024),
    "tiny": Shape("tiny", 128, 256, 2, 4, 2, 512, 2, 64),
}
VO = ("v_proj", "o_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ROWS = {  # key: table label
    "floor": "floor: frozen, input grads only (fwd + bwd)",
    "spra-vo": "spra V,O",
    "spra-all": "spra all linears",
    "lora-vo": "PEFT LoRA r16 V,O",
    "lora-all": "PEFT LoRA r16 all linears",
    "peft-sparta": "peft-sparta V,O",
    "full": "full fine-tune (bf16 params, fused AdamW)",
}

# Measured earlier on an H200, bf16, random-init Llama-8B shape, batch 2x1024 — (step ms, peak GiB);
# printed beside each run's own rows, to see whether the machine reproduces them.
ANCHORS = {
    "floor": (144, 26.5),
    "lora-vo": (161, 28.6),
    "peft-sparta": (214, 30.4),
    "lora-all": (240, 36.5),
    "full": (234, 60.2),
}
# (row, most × floor, most GiB over the floor's peak or None)
TARGETS = [("spra-vo", 1.05, 0.5), ("spra-all", 1.15, None)]


# ---------------------------------------------------------------------------------------------- setup


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(shape: Shape, device: torch.device):
    """A random-init bf16 LlamaForCausalLM allocated on `device` directly (no fp32 copy, no host pass).

    With bf16 as the default dtype every parameter is created in bf16 on the device, and the
    init kernels (transformers' normal(0, 0.02), ones for the norms) run there in milliseconds."""
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16), device:
        model = transformers.LlamaForCausalLM(shape.config())
    return model.train()


# ---------------------------------------------------------------------------------------------- rows
# Each row builder takes the fresh model and returns (step function, trained values, note). The step
# function takes the input ids and returns the loss tensor.


def row_floor(model, shape, device):
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()  # backward runs through every layer, no weight gradient

    def step(x):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss

    return step, 0, ""


def train_step(model, opt):
    """One training step on a batch of token ids: forward with labels, backward, optimizer step."""

    def step(x):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _spra(modules, target):
    def build(model, shape, device):
        from spra_tools.train import SparseAdamW, SparseModel

        lora, base = shape.budget(modules)
        sm = SparseModel(model, density=lora / base, seed=0, targets=[target])
        opt, note = SparseAdamW(sm, lr=1e-4), ""
        count = sum(p.numel() for p in sm.parameters())

        step = train_step(model, opt)

        return step, count, f"density {lora / base:.5f}" + (f"; {note}" if note else "")

    return build


def _lora(modules):
    def build(model, shape, device):
        import peft

        config = peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=list(modules))
        pm = peft.get_peft_model(model, config)
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})

        step = train_step(pm, opt)

        return step, sum(p.numel() for p in params), f"peft {peft.__version__}, adapter {'/'.join(dtypes)}"

    return build


def row_peft_sparta(model, shape, device):
    """peft-sparta's own way (its SFT trainer's): wrap in SpaRTA, torch AdamW over `sparta.parameters()`.

    SpaRTA samples a Bernoulli mask per non-frozen tensor (keep probability derived from `sparsity`,
    a fraction of *all* model parameters), keeps fp32 deltas, and in every training forward writes
    ``W[idx] = W0[idx] + delta`` by advanced indexing into every parameter (frozen ones too, with
    empty indices), so autograd computes dense weight gradients and gathers them."""
    from peft_sparta import SpaRTA

    lora, base = shape.budget(VO)
    density = lora / base
    total = sum(p.numel() for p in model.parameters())
    # Its default frozen list leaves the output head trainable; add it so only V,O train.
    frozen = ["embed_tokens", "self_attn.q", "self_attn.k", "mlp", "norm", "lm_head"]
    sparta = SpaRTA(model, sparsity=1 - density * base / total, frozen_modules=frozen).to(device)
    sparta.train()
    params = list(sparta.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")  # its build_optimizer's choice

    step = train_step(sparta, opt)

    return step, sum(p.numel() for p in params), f"keep prob {density:.5f} (Bernoulli), frozen {frozen}"


def row_full(model, shape, device):
    params = list(model.parameters())  # bf16 params; AdamW's state follows them (bf16): no fp32 master
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

    step = train_step(model, opt)

    return step, sum(p.numel() for p in params), "bf16 params, grads and AdamW state"


BUILDERS = {
    "floor": row_floor,
    "spra-vo": _spra(VO, "vo"),
    "spra-all": _spra(ALL_LINEAR, "all-linear"),
    "lora-vo": _lora(VO),
    "lora-all": _lora(ALL_LINEAR),
    "peft-sparta": row_peft_sparta,
    "full": row_full,
}


def missing_dependency(row: str) -> str | None:
    """Why a row cannot run here (an optional package is absent), else None."""
    import importlib.util

    need = {"lora-vo": "peft", "lora-all": "peft", "peft-sparta": "peft_sparta"}.get(row)
    if need and importlib.util.find_spec(need) is None:
        return f"skipped: {need} not installed"
    return None


def time_steps(step, shape: Shape, device: torch.device, steps: int, warmup: int) -> dict:
    """`step(x)` on one fixed random batch: median and every time of `steps` after `warmup`, the
    last loss, and the peak memory on CUDA (reset it before building what the row measures)."""
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=device, generator=gen)
    for _ in range(warmup):
        step(x)
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        loss = step(x)
        sync(device)
        times.append(time.perf_counter() - t)
    out = {"ms": statistics.median(times) * 1e3, "times_ms": [round(t * 1e3, 3) for t in times]}
    out["loss"] = float(loss.detach())
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return out


def run_row(row: str, shape: Shape, device: torch.device, steps: int, warmup: int) -> dict:
    result = {"row": row, "label": ROWS[row], "values": None, "ms": None, "peak_gib": None, "note": ""}
    skip = missing_dependency(row)
    if skip:
        result["note"] = skip
        return result
    return measure_row(
        result,
        lambda: build_model(shape, device),
        lambda m: BUILDERS[row](m, shape, device),
        shape,
        device,
        steps,
        warmup,
    )


def measure_row(result: dict, build, make_step, shape: Shape, device: torch.device, steps: int, warmup: int) -> dict:
    """`result` with a row measured: its model built (`build()`, timed), the peak memory reset, its
    step made (``make_step(model)`` -> (step, trainable values, note)) and timed (`time_steps`).
    A failing row (OOM, API drift) gets the error as its note and no numbers, so it cannot lose the
    other rows'; the model is freed either way."""
    model = step = None
    free(device)
    try:
        t0 = time.perf_counter()
        model = build()
        sync(device)
        result["build_s"] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step, result["values"], result["note"] = make_step(model)
        result.update(time_steps(step, shape, device, steps, warmup))
        if not math.isfinite(result["loss"]):
            result["note"] = f"NON-FINITE LOSS; {result['note']}"
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        result["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        result["ms"] = result["peak_gib"] = None
    finally:
        model = step = None  # noqa: F841  (drop the references before freeing)
        free(device)
    return result


# ---------------------------------------------------------------------------------------------- report


def targets_line(results: dict) -> tuple[str, list]:
    floor = results.get("floor", {})
    checks, parts = [], []
    for row, most_x, most_gib in TARGETS:
        r = results.get(row, {})
        if r.get("ms") is None or floor.get("ms") is None:
            checks.append({"row": row, "status": "n/a"})
            parts.append(f"{ROWS[row]} ≤ {most_x:g}× floor: n/a")
            continue
        ratio = r["ms"] / floor["ms"]
        ok = ratio <= most_x
        text = f"{ROWS[row]} ≤ {most_x:g}× floor ({ratio:.3f}×)"
        check = {"row": row, "ratio": ratio, "max_ratio": most_x}
        if most_gib is not None:
            if r.get("peak_gib") is not None and floor.get("peak_gib") is not None:
                extra = r["peak_gib"] - floor["peak_gib"]
                ok = ok and extra <= most_gib
                text += f" and peak ≤ floor + {most_gib:g} GiB (+{extra:.2f} GiB)"
                check.update(extra_gib=extra, max_extra_gib=most_gib)
            else:
                text += f" and peak ≤ floor + {most_gib:g} GiB (peak n/a)"
        check["status"] = "PASS" if ok else "MISS"
        checks.append(check)
        parts.append(f"{text}: **{check['status']}**")
    return "targets: " + "; ".join(parts), checks


def count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 10**6 else f"{n:,}"


def markdown(meta: dict, shape: Shape, rows: list[dict], targets: str) -> str:
    floor = next((r for r in rows if r["row"] == "floor"), {})
    lines = [
        f"# bench_train — {meta['date']}, {meta['gpu']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"spra backend {meta['backend']}",
        f"shape {shape.name} (hidden {shape.hidden}, {shape.layers} layers, vocab {shape.vocab}), "
        f"batch {shape.batch}×{shape.seq}, bf16, sdpa; median of {meta['steps']} steps after {meta['warmup']} warm-up\n",
        "| row | trainable values | step ms (median) | × floor | peak GiB | Δ peak vs floor GiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = r["label"]
        if r["row"].startswith("spra") and r["values"]:
            label += f" at {count(r['values'])} values"
        ms = f"{r['ms']:.1f}" if r["ms"] is not None else "–"
        ratio = f"{r['ms'] / floor['ms']:.3f}" if r["ms"] is not None and floor.get("ms") else "–"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "–"
        delta = f"{r['peak_gib'] - floor['peak_gib']:+.2f}" if r["peak_gib"] is not None and floor.get("peak_gib") is not None else "–"  # fmt: skip
        values = count(r["values"]) if r["values"] is not None else "–"
        lines.append(f"| {label} | {values} | {ms} | {ratio} | {peak} | {delta} |")
    lines.append("")
    lines.append(targets)
    notes = [f"{ROWS[r['row']]}: {r['note']}" for r in rows if r["note"]]
    if notes:
        lines.append("\nnotes: " + " · ".join(notes))
    anchors = "; ".join(
        f"{ROWS[k].split(':')[0].split(' (')[0]} {ms} ms / {gib} GiB" for k, (ms, gib) in ANCHORS.items()
    )
    lines.append(f"\nanchors (H200, 8B shape, batch 2×1024, measured earlier): {anchors}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", choices=[*SHAPES, "all"],
                    help="one or more of 8b, 1b, tiny, or all (default: 8b with CUDA, else tiny)")  # fmt: skip
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="default: all rows")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per row first")
    ap.add_argument("--json", metavar="OUT", help="write every number (and per-step times) to OUT")
    ap.add_argument("--markdown", action="store_true", help="print the table (the default unless --json)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = args.shape or ["8b" if device.type == "cuda" else "tiny"]
    shapes = list(SHAPES) if "all" in shapes else list(dict.fromkeys(shapes))
    if device.type == "cpu" and set(shapes) - {"tiny"}:
        ap.error("--shape 8b / 1b need a CUDA device (on CPU, use --shape tiny)")
    rows = [r for r in ROWS if r in args.rows]  # table order; the floor first

    from spra_tools import ops

    t0 = time.perf_counter()
    backend = ops.backend_for(device)  # builds the compiled extension now (once) if it must, not inside a row
    print(f"spra backend for {device.type}: {backend} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    meta = {
        "date": str(datetime.date.today()),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (timings meaningless)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "backend": backend,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    report = {"meta": meta, "anchors_8b": {k: {"ms": a, "peak_gib": b} for k, (a, b) in ANCHORS.items()}, "shapes": []}
    tables = []
    for name in shapes:
        shape = SHAPES[name]
        results = {}
        for row in rows:
            t = time.perf_counter()
            r = results[row] = run_row(row, shape, device, args.steps, args.warmup)
            ms = f"{r['ms']:.1f} ms" if r["ms"] is not None else "–"
            peak = f", peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""
            build = f", build {r['build_s']:.1f} s" if "build_s" in r else ""
            print(
                f"[{name}] {row}: {ms}{peak}{build}, row {time.perf_counter() - t:.1f} s  {r['note']}", file=sys.stderr
            )
        line, checks = targets_line(results)
        report["shapes"].append(
            {"shape": name, "batch": [shape.batch, shape.seq], "rows": list(results.values()), "targets": checks}
        )
        tables.append(markdown(meta, shape, list(results.values()), line))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.markdown or not args.json:
        print("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
