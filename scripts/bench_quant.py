"""Quantized-base benchmark: SpaRTA on an NF4 base against PEFT QLoRA r16 on the same Linear4bit base.

Speed (default): a random-init bf16 Llama (sdpa) built on the device, every decoder linear replaced
by a bitsandbytes NF4 `Linear4bit` (the module transformers' BitsAndBytesConfig loads; the head and
embeddings stay bf16), random token ids, a causal-LM loss. One step = forward + backward + optimizer
step + zero_grad (the floor: forward + input-grad backward on the frozen NF4 base). Each row reports
the median step time over --steps timed steps after --warmup and the peak allocated memory from the
row's start; the SpaRTA budgets are LoRA r16's parameter counts on the same layers (V,O and all
linears), so each spra row trains as many values as its QLoRA neighbour, and its ratios are to that
neighbour. The sparse term's products run by the sparse kernel, and in one more row as dense GEMMs
over a transient dense Δ (SPRA_TOOLS_UNMERGED_PRODUCT=dense), to show which is faster where. Targets: peak ≤ QLoRA's and step time ≤ 1.0× QLoRA's. Gradient checkpointing (off by
default: the 8B shape fits an H200 without it) applies to every row when asked for.

Quality (--quality): a small random Llama saved as a bf16 checkpoint, loaded NF4 through
transformers, then trained --train-steps steps on sequences of a fixed random Markov chain, once
with SpaRTA all linears and once with PEFT LoRA r16 all linears (same budget, data and order).
Reported: held-out loss of the bf16 base, of each adapter on the NF4 base it trained on, and of
each applied to the bf16 base — ours attached in place, LoRA merged (merge_and_unload).

    python scripts/bench_quant.py                                      # the H200 table, 8B shape, 2x1024
    python scripts/bench_quant.py --quality                            # the quality table (GPU: ~1 min)
    python scripts/bench_quant.py --shape tiny --steps 2 --warmup 1    # CPU smoke run, every row
    python scripts/bench_quant.py --quality --shape tiny --train-steps 20
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import transformers
from bench_train import ALL_LINEAR, GIB, LORA_RANK, SHAPES, VO, Shape, build_model, free, measure_row, train_step  # noqa: E402

ROWS = {  # key: (table label, modules, the QLoRA row it is compared with)
    "floor": ("floor: frozen NF4 base, input grads only", None, None),
    "spra-vo": ("spra V,O on NF4", VO, "qlora-vo"),
    "qlora-vo": ("PEFT QLoRA r16 V,O", VO, None),
    "spra-all": ("spra all linears on NF4", ALL_LINEAR, "qlora-all"),
    "spra-all-dense": ("spra all linears on NF4, dense Δ products", ALL_LINEAR, "qlora-all"),
    "qlora-all": ("PEFT QLoRA r16 all linears", ALL_LINEAR, None),
}
TARGETS = {"ms": 1.0, "peak": 1.0}  # spra row / its QLoRA row, at most
COMPUTE = torch.bfloat16


def quantize_nf4(model: torch.nn.Module, device: torch.device) -> None:
    """Every decoder-layer nn.Linear of `model` replaced, in place, by a bitsandbytes NF4 Linear4bit
    holding the quantized weight (bf16 compute, no double quantization: QLoRA's usual setting)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=COMPUTE, quant_type="nf4", device="meta")  # fmt: skip
                weight = child.weight.data
                q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4").to(device)  # quantizes
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q)
                del child, weight
    free(device)


def row_floor(model, shape, checkpointing):
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()  # backward runs through every layer, no weight gradient
    _checkpointing(model, checkpointing)

    def step(x):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss

    return step, 0, ""


def _checkpointing(model, on: bool) -> None:
    if on:  # non-reentrant: the trainable values are not inputs of the checkpointed blocks
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def spra_model(model, shape: Shape, modules, base=None):
    from spra_tools.train import SparseModel

    lora, weights = shape.budget(modules)
    target = "vo" if modules == VO else "all-linear"
    return SparseModel(model, density=lora / weights, seed=0, targets=[target], base=base), lora / weights


def row_spra(modules, product="sparse"):
    def build(model, shape, checkpointing):
        from spra_tools import quantized
        from spra_tools.train import SparseAdamW

        # A random-init model has no checkpoint files: fingerprint against a stand-in checkpoint of
        # the same names and shapes (only the adapter's metadata depends on it, not the step).
        os.environ[quantized.PRODUCT_VARIABLE] = product  # read when the layers are patched
        try:
            sm, density = spra_model(model, shape, modules, base=standin_checkpoint(model))
        finally:
            del os.environ[quantized.PRODUCT_VARIABLE]
        _checkpointing(model, checkpointing)
        model.train()
        opt = SparseAdamW(sm, lr=1e-4)
        return train_step(model, opt), sum(p.numel() for p in sm.parameters()), f"density {density:.5f}"

    return build


_STANDIN: dict = {}  # the stand-in checkpoint's directory, written once per run (every row builds the same model)


def standin_checkpoint(model):
    """A safetensors checkpoint holding each quantized layer's dequantized weight (bf16) under its
    name: what SparseModel fingerprints when the base was never saved (random init)."""
    from safetensors.torch import save_file

    from spra_tools import quantized
    from spra_tools.checkpoint import open_checkpoint

    if "dir" not in _STANDIN:
        _STANDIN["dir"] = tempfile.TemporaryDirectory()
        layers = quantized.quantized_layers(model)
        tensors = {n: quantized.dequantized(m).to(torch.bfloat16).cpu() for n, m in layers.items()}
        save_file(tensors, f"{_STANDIN['dir'].name}/model.safetensors")
    return open_checkpoint(_STANDIN["dir"].name)


def row_qlora(modules):
    def build(model, shape, checkpointing):
        import peft

        config = peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=list(modules))
        _checkpointing(model, checkpointing)
        if checkpointing:
            model.enable_input_require_grads()
        pm = peft.get_peft_model(model, config)
        params = [p for p in pm.parameters() if p.requires_grad]
        device = params[0].device
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
        pm.train()
        return (
            train_step(pm, opt),
            sum(p.numel() for p in params),
            f"peft {peft.__version__}, adapter {'/'.join(dtypes)}",
        )

    return build


BUILDERS = {
    "floor": row_floor,
    "spra-vo": row_spra(VO),
    "qlora-vo": row_qlora(VO),
    "spra-all": row_spra(ALL_LINEAR),
    "spra-all-dense": row_spra(ALL_LINEAR, "dense"),
    "qlora-all": row_qlora(ALL_LINEAR),
}


def run_row(row: str, shape: Shape, device: torch.device, steps: int, warmup: int, checkpointing: bool) -> dict:
    result = {"row": row, "label": ROWS[row][0], "values": None, "ms": None, "peak_gib": None, "note": ""}

    def build():
        model = build_model(shape, device)
        quantize_nf4(model, device)
        return model

    def make_step(model):
        if device.type == "cuda":  # the NF4 base alone, before the row adds to it
            result["base_gib"] = torch.cuda.memory_allocated(device) / GIB
        return BUILDERS[row](model, shape, checkpointing)

    return measure_row(result, build, make_step, shape, device, steps, warmup)


def speed_table(meta: dict, shape: Shape, results: dict) -> str:
    lines = [
        f"# bench_quant — {meta['date']}, {meta['gpu']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"bitsandbytes {meta['bitsandbytes']}, spra backend {meta['backend']}",
        f"shape {shape.name} (hidden {shape.hidden}, {shape.layers} layers), batch {shape.batch}×{shape.seq}, NF4 base "
        f"(bf16 compute), gradient checkpointing {'on' if meta['checkpointing'] else 'off'}; median of {meta['steps']} "
        f"steps after {meta['warmup']} warm-up\n",
        "| row | trainable values | step ms (median) | × QLoRA | peak GiB | × QLoRA peak |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for key, r in results.items():
        anchor = results.get(ROWS[key][2] or "", {})
        ms = f"{r['ms']:.1f}" if r["ms"] is not None else "–"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "–"
        x_ms = x_peak = "–"
        if r["ms"] is not None and anchor.get("ms"):
            x_ms = f"{r['ms'] / anchor['ms']:.3f}"
            verdicts.append(f"{r['label']} step ≤ {TARGETS['ms']:g}× QLoRA: "
                            f"{'PASS' if r['ms'] / anchor['ms'] <= TARGETS['ms'] else 'MISS'}")  # fmt: skip
        if r["peak_gib"] is not None and anchor.get("peak_gib"):
            x_peak = f"{r['peak_gib'] / anchor['peak_gib']:.3f}"
            verdicts.append(f"{r['label']} peak ≤ QLoRA's: "
                            f"{'PASS' if r['peak_gib'] <= TARGETS['peak'] * anchor['peak_gib'] else 'MISS'}")  # fmt: skip
        values = f"{r['values'] / 1e6:.2f} M" if r["values"] else ("0" if r["values"] == 0 else "–")
        lines.append(f"| {r['label']} | {values} | {ms} | {x_ms} | {peak} | {x_peak} |")
    lines.append("\ntargets: " + ("; ".join(verdicts) if verdicts else "n/a (no GPU timings)"))
    notes = [f"{r['label']}: {r['note']}" for r in results.values() if r["note"]]
    if notes:
        lines.append("\nnotes: " + " · ".join(notes))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- quality


def markov_batches(vocab: int, seq: int, batch: int, count: int, seed: int) -> list[torch.Tensor]:
    """`count` batches of token ids from one fixed random Markov chain (each token has 4 likely
    successors): a language a model can learn, whose loss floor is far below log(vocab)."""
    gen = torch.Generator().manual_seed(1234)  # the chain itself: the same for every split
    successors = torch.randint(0, vocab, (vocab, 4), generator=gen)
    probs = torch.tensor([0.55, 0.25, 0.15, 0.05])
    gen = torch.Generator().manual_seed(seed)  # the samples: one stream per split
    out = []
    for _ in range(count):
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        for t in range(1, seq):
            pick = torch.multinomial(probs, batch, replacement=True, generator=gen)
            ids[:, t] = successors[ids[:, t - 1], pick]
        out.append(ids)
    return out


def eval_loss(model, batches, device) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=b.to(device), labels=b.to(device)).loss.item() for b in batches]
    return sum(losses) / len(losses)


def train_loop(model, step, batches, device) -> list[float]:
    model.train()
    losses = []
    for b in batches:
        losses.append(float(step(b.to(device)).detach()))
    return losses


def quality(shape: Shape, device: torch.device, train_steps: int, lr_spra: float, lr_lora: float) -> dict:
    import peft

    from spra_tools.live import attach
    from spra_tools.train import SparseAdamW

    nf4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=COMPUTE)
    train_batches = markov_batches(shape.vocab, shape.seq, shape.batch, train_steps, seed=1)
    held_out = markov_batches(shape.vocab, shape.seq, shape.batch, 8, seed=2)
    out = {"shape": shape.name, "train_steps": train_steps, "lr_spra": lr_spra, "lr_lora": lr_lora}
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(shape.config()).to(torch.bfloat16).save_pretrained(d)

        def bf16():
            return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).to(device)

        def quantized():
            return transformers.AutoModelForCausalLM.from_pretrained(
                d, quantization_config=nf4, dtype=torch.bfloat16, device_map={"": device}
            )

        out["base_bf16"] = eval_loss(bf16(), held_out, device)
        out["base_nf4"] = eval_loss(quantized(), held_out, device)

        model = quantized()
        sm, _ = spra_model(model, shape, ALL_LINEAR)
        losses = train_loop(model, train_step(model, SparseAdamW(sm, lr=lr_spra)), train_batches, device)
        out["spra_values"] = sum(p.numel() for p in sm.parameters())
        out["spra_train_last"] = statistics.mean(losses[-10:])
        out["spra_nf4"] = eval_loss(model, held_out, device)
        adapter = sm.adapter()  # bf16 values, fingerprinted against the bf16 checkpoint
        target = bf16()
        attach(target, adapter)  # verified against the bf16 weights, applied in place
        out["spra_bf16"] = eval_loss(target, held_out, device)
        del model, sm, target

        model = quantized()
        config = peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=list(ALL_LINEAR))
        pm = peft.get_peft_model(model, config)
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr_lora, fused=device.type == "cuda")
        losses = train_loop(pm, train_step(pm, opt), train_batches, device)
        out["lora_values"] = sum(p.numel() for p in params)
        out["lora_train_last"] = statistics.mean(losses[-10:])
        out["lora_nf4"] = eval_loss(pm, held_out, device)
        state = peft.get_peft_model_state_dict(pm)
        merged = peft.get_peft_model(bf16(), config)
        peft.set_peft_model_state_dict(merged, state)
        out["lora_bf16"] = eval_loss(merged.merge_and_unload(), held_out, device)
    return out


def quality_table(meta: dict, shape: Shape, q: dict) -> str:
    return "\n".join([
        f"# bench_quant --quality — {meta['date']}, {meta['gpu']}, torch {meta['torch']}, "
        f"bitsandbytes {meta['bitsandbytes']}",
        f"shape {shape.name} (hidden {shape.hidden}, {shape.layers} layers, vocab {shape.vocab}), batch "
        f"{shape.batch}×{shape.seq}, {q['train_steps']} steps on the NF4 base (Markov-chain tokens), all linears, "
        f"lr spra {q['lr_spra']:g} / LoRA {q['lr_lora']:g}, constant; held-out loss (8 batches)\n",
        "| | trainable values | train loss (last 10) | on the NF4 base | applied to the bf16 base |",
        "|---|---:|---:|---:|---:|",
        f"| base (no adapter) | 0 | – | {q['base_nf4']:.4f} | {q['base_bf16']:.4f} |",
        f"| spra (attached in place) | {q['spra_values']:,} | {q['spra_train_last']:.4f} | {q['spra_nf4']:.4f} | "
        f"{q['spra_bf16']:.4f} |",
        f"| PEFT LoRA r16 (merged) | {q['lora_values']:,} | {q['lora_train_last']:.4f} | {q['lora_nf4']:.4f} | "
        f"{q['lora_bf16']:.4f} |",
    ])  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shape",
        choices=list(SHAPES),
        help="8b (default with CUDA), else tiny; --quality takes --quality-shape (or tiny)",
    )
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="default: all rows")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per row first")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="for every row")
    ap.add_argument("--quality", action="store_true", help="the loss comparison instead of the step timings")
    ap.add_argument("--quality-shape", default="small", choices=["small", "tiny"],
                    help="--quality's model: small (hidden 256, 4 layers) or tiny (the smoke shape)")  # fmt: skip
    ap.add_argument("--train-steps", type=int, default=300, help="--quality: training steps")
    ap.add_argument("--lr-spra", type=float, default=2e-3, help="--quality: SpaRTA's learning rate")
    ap.add_argument("--lr-lora", type=float, default=2e-3, help="--quality: LoRA's learning rate")
    ap.add_argument("--json", metavar="OUT", help="write every number (and per-step times) to OUT")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    import bitsandbytes

    from spra_tools import ops

    backend = ops.backend_for(device)  # builds the compiled extension now (once) if it must, not inside a row
    meta = {
        "date": str(datetime.date.today()),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (timings meaningless)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "backend": backend,
        "steps": args.steps,
        "warmup": args.warmup,
        "checkpointing": args.gradient_checkpointing,
    }
    if args.quality:
        shape = SHAPES["tiny"] if args.quality_shape == "tiny" or args.shape == "tiny" else SMALL
        q = quality(shape, device, args.train_steps, args.lr_spra, args.lr_lora)
        report, table = {"meta": meta, "quality": q}, quality_table(meta, shape, q)
    else:
        name = args.shape or ("8b" if device.type == "cuda" else "tiny")
        if device.type == "cpu" and name != "tiny":
            ap.error("--shape 8b / 1b need a CUDA device (on CPU, use --shape tiny)")
        shape = SHAPES[name]
        results = {}
        for row in [r for r in ROWS if r in args.rows]:
            t = time.perf_counter()
            r = results[row] = run_row(row, shape, device, args.steps, args.warmup, args.gradient_checkpointing)
            ms = f"{r['ms']:.1f} ms" if r["ms"] is not None else "–"
            peak = f", peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""
            print(f"[{name}] {row}: {ms}{peak}, row {time.perf_counter() - t:.1f} s  {r['note']}", file=sys.stderr)
        report, table = {"meta": meta, "shape": name, "rows": list(results.values())}, speed_table(meta, shape, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(table + "\n")


SMALL = Shape("small", 256, 768, 4, 4, 2, 512, 8, 128)  # --quality: trains a few hundred steps in a minute

if __name__ == "__main__":
    main()
