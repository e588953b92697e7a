"""End-to-end training throughput: `spra-tools train` as a user runs it, against TRL + PEFT LoRA and the engine.

One table, everything measured in the same run on the same files: a random-init bf16 Llama
checkpoint saved to disk with `save_pretrained` (1B or 8B shape, a word-level tokenizer of the
shape's vocabulary) and a JSONL corpus of causal-LM records whose lengths vary (some longer than
--max-length). Rows:

* `spra-tools train` — the CLI in a fresh process, V,O and all linears at LoRA r16's counts;
* TRL `SFTTrainer` + PEFT LoRA r16 on the same data, steps, batch, max length and dtype;
* the engine step of `scripts/bench_train.py` (random full-length batches, no data pipeline).

Per row: steady-state tokens/s (steps after --warmup, real tokens, i.e. without padding), the
tokens computed including padding, time to first step from process start, wall time, peak
memory. The anchor for time to first step is a fresh process that imports transformers and loads
the checkpoint onto the GPU ("model load").

    python scripts/bench_loop.py --shape 1b                 # the H200 table
    python scripts/bench_loop.py --shape tiny --steps 6 --warmup 2 --device cpu   # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_train import ALL_LINEAR, LORA_RANK, SHAPES, VO  # noqa: E402

LR = 1e-4


def write_checkpoint(shape, out: Path, device: str) -> None:
    """A random-init bf16 LlamaForCausalLM and a word-level tokenizer of the shape's vocabulary."""
    import torch
    import transformers
    from bench_train import build_model
    from tokenizers import Tokenizer, models, pre_tokenizers

    if (out / "config.json").exists():
        return
    model = build_model(shape, torch.device(device))
    model.config.use_cache = True
    model.save_pretrained(out, max_shard_size="5GB")
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), shape.vocab)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(out)


def write_corpus(path: Path, records: int, vocab: int, max_length: int, seed: int = 0) -> dict:
    """`records` JSONL texts of random words, lengths uniform in [max_length/8, 1.25 max_length]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(4, max_length // 8), int(1.25 * max_length) + 1, size=records)
    if not path.exists():
        with open(path, "w") as f:
            for n in lengths:
                words = rng.integers(4, vocab, size=int(n))
                f.write(json.dumps({"text": " ".join(f"w{w}" for w in words)}) + "\n")
    return {"records": records, "mean_words": float(lengths.mean()), "max_words": int(lengths.max())}


def density_for(shape, modules) -> float:
    lora, base = shape.budget(modules)
    return lora / base


def run_spra(args, shape, ckpt: Path, corpus: Path, work: Path, label: str, modules, preset: str) -> dict:
    """`spra-tools train` in a fresh process; throughput from its metrics.jsonl step times."""
    log = work / f"log-{label}"
    out = work / f"{label}.spra"
    cmd = [sys.executable, "-m", "spra_tools", "train", str(ckpt), "--data", str(corpus), "-o", str(out),
           "--targets", preset, "--density", f"{density_for(shape, modules):.6g}", "--steps", str(args.steps),
           "--batch-size", str(shape.batch), "--max-length", str(args.max_length), "--lr", str(LR),
           "--device", args.device, "--log-dir", str(log), "--overwrite"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.time() - t0
    if proc.returncode != 0:
        return {"row": label, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    steps = [r for r in map(json.loads, open(log / "metrics.jsonl")) if r["split"] == "train"]
    peak = re.search(r"peak memory:\s+([\d.]+) (GiB|MiB)", proc.stdout)
    result = _steady(label, steps, t0, wall, args.warmup)
    result["peak_gib"] = None if peak is None else float(peak[1]) / (1 if peak[2] == "GiB" else 1024)
    result["stdout"] = proc.stdout[-2000:]
    return result


def _steady(label: str, steps: list[dict], t0: float, wall: float, warmup: int) -> dict:
    """Steady-state throughput over the steps after `warmup` (records with time, tokens[, computed])."""
    timed = steps[warmup:]
    span = timed[-1]["time"] - steps[warmup - 1]["time"] if warmup else timed[-1]["time"] - t0
    tokens = sum(s["tokens"] for s in timed)
    computed = sum(s.get("computed_tokens", 0) for s in timed) or None
    return {
        "row": label,
        "tokens_per_s": tokens / span,
        "computed_per_s": None if computed is None else computed / span,
        "padding": None if computed is None else 1 - tokens / computed,
        "first_step_s": steps[0]["time"] - t0,
        "wall_s": wall,
        "step_ms": 1e3 * span / len(timed),
    }


def trl_worker(t0: float, ckpt: str, corpus: str, steps: int, batch: int, max_length: int, modules: str) -> None:
    """Runs in its own process (`--trl-worker`): TRL SFTTrainer + PEFT LoRA r16; prints one RESULT json line."""
    import datasets
    import peft
    import torch
    import transformers
    import trl

    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).to("cuda")
    lora = peft.LoraConfig(
        r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=modules.split(","), task_type="CAUSAL_LM"
    )
    data = datasets.load_dataset("json", data_files=corpus, split="train")
    times, tokens = [], []

    class Counting(trl.trainer.sft_trainer.DataCollatorForLanguageModeling):
        def __call__(self, examples):  # collated on the CPU just before each step (no workers)
            out = super().__call__(examples)
            mask = out.get("attention_mask")
            real = int(mask.sum()) if mask is not None else int((out["labels"] != -100).sum())
            tokens.append((real, int(out["input_ids"].numel())))
            return out

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            times.append(time.time())

    cfg = trl.SFTConfig(output_dir="/tmp/bench-loop-trl", max_steps=steps, per_device_train_batch_size=batch,
                        max_length=max_length, bf16=True, learning_rate=LR, logging_steps=10**9, save_strategy="no",
                        report_to=[], packing=False, dataset_text_field="text", lr_scheduler_type="cosine",
                        dataloader_num_workers=0, gradient_checkpointing=False)  # fmt: skip
    trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=lora,
                             data_collator=Counting(pad_token_id=tok.pad_token_id), callbacks=[Clock()])  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = {"times": times, "tokens": tokens[: len(times)], "trainable": trainable,
              "peak": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip
    print("RESULT " + json.dumps(result))


def run_trl(args, shape, ckpt: Path, corpus: Path, label: str, modules) -> dict:
    t0 = time.time()
    cmd = [sys.executable, __file__, "--trl-worker", repr(t0), str(ckpt), str(corpus), str(args.steps),
           str(shape.batch), str(args.max_length), ",".join(modules)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.time() - t0
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {"row": label, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    r = json.loads(line[len("RESULT ") :])
    steps = [{"time": t, "tokens": n, "computed_tokens": c} for t, (n, c) in zip(r["times"], r["tokens"])]
    result = _steady(label, steps, t0, wall, args.warmup)
    result.update(peak_gib=r["peak"], trainable=r["trainable"])
    return result


def run_engine(args, shape, work: Path) -> list[dict]:
    """bench_train.py's spra rows for this shape: the engine step on full-length random batches."""
    out = work / "engine.json"
    cmd = [sys.executable, str(HERE / "bench_train.py"), "--shape", shape.name, "--rows", "spra-vo", "spra-all",
           "--steps", "10", "--warmup", "3", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        return [{"row": "engine", "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}]
    rows = []
    tokens = shape.batch * shape.seq  # bench_train's batch for this shape, every token real
    for r in json.load(open(out))["shapes"][0]["rows"]:
        if r["ms"] is None:
            rows.append({"row": f"engine {r['row']}", "error": r["note"]})
            continue
        rows.append({"row": f"engine step {r['label']} ({shape.batch}x{shape.seq})", "step_ms": r["ms"],
                     "tokens_per_s": tokens / (r["ms"] / 1e3), "peak_gib": r["peak_gib"]})  # fmt: skip
    return rows


def model_load_seconds(ckpt: Path, device: str) -> float:
    code = (
        "import sys, time; t0 = float(sys.argv[1]); import torch, transformers; "
        "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16).to(sys.argv[3]); "
        "torch.cuda.synchronize() if sys.argv[3] == 'cuda' else None; print(time.time() - t0)"
    )
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code, repr(t0), str(ckpt), device], capture_output=True, text=True)
    return float(proc.stdout.strip().splitlines()[-1])


def main():
    if sys.argv[1:2] == ["--trl-worker"]:
        t0, ckpt, corpus, steps, batch, max_length, modules = sys.argv[2:]
        return trl_worker(float(t0), ckpt, corpus, int(steps), int(batch), int(max_length), modules)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", choices=list(SHAPES), default=["1b"])
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps per run")
    ap.add_argument(
        "--warmup", type=int, default=10, help="steps left out of the steady-state rate (attention plans per length)"
    )
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--records", type=int, default=4000)
    ap.add_argument("--rows", nargs="+", default=["spra", "trl", "engine"], choices=["spra", "trl", "engine"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", default="/tmp/bench_loop")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    import torch

    results = []
    for name in args.shape:
        shape = SHAPES[name]
        work = Path(args.workdir) / name
        work.mkdir(parents=True, exist_ok=True)
        ckpt, corpus = work / "base", work / "train.jsonl"
        write_checkpoint(shape, ckpt, args.device)
        data = write_corpus(corpus, args.records, shape.vocab, args.max_length)
        load = model_load_seconds(ckpt, args.device)
        rows = []
        for label, modules, preset in (("spra-tools train V,O", VO, "vo"), ("spra-tools train all", ALL_LINEAR,
                                                                                "all-linear")):  # fmt: skip
            if "spra" in args.rows:
                rows.append(run_spra(args, shape, ckpt, corpus, work, label.split()[-1], modules, preset))
                rows[-1]["row"] = label
            if "trl" in args.rows:
                rows.append(run_trl(args, shape, ckpt, corpus, f"TRL + LoRA r16 {label.split()[-1]}", modules))
        if "engine" in args.rows:
            rows += run_engine(args, shape, work)
        results.append({"shape": name, "batch": shape.batch, "max_length": args.max_length, "data": data,
                        "model_load_s": load, "rows": rows})  # fmt: skip

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"# bench_loop — {datetime.date.today()}, {gpu}, torch {torch.__version__}, steps {args.steps}, "
          f"warm-up {args.warmup}")  # fmt: skip
    for res in results:
        print(
            f"\n{res['shape']} shape, batch {res['batch']} x max {res['max_length']}, {res['data']['records']} "
            f"records (mean {res['data']['mean_words']:.0f} tokens); model load {res['model_load_s']:.1f} s\n"
        )
        print("| run | tokens/s (steady) | computed tokens/s | padding | step ms | first step s | wall s | peak GiB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in res["rows"]:
            if "error" in r:
                print(f"| {r['row']} | error: {r['error']} |||||||")
                continue

            def f(key, fmt, r=r):
                return "-" if r.get(key) is None else format(r[key], fmt)

            print(f"| {r['row']} | {f('tokens_per_s', ',.0f')} | {f('computed_per_s', ',.0f')} | {f('padding', '.1%')} "
                  f"| {f('step_ms', '.1f')} | {f('first_step_s', '.1f')} | {f('wall_s', '.1f')} | {f('peak_gib', '.2f')} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
