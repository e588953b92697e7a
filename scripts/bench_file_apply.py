"""File apply on the CPU, timed as a user runs it: `spra-tools apply` against `cp -r` and load + merge + save.

Builds (once, cached under --dir) a random-init Llama-shaped bf16 checkpoint with transformers'
save_pretrained (safetensors, sharded; the default shape is about 1.1 GB), a seeded all-linear
adapter with random values, the same adapter in peft-sparta's layout, and a PEFT LoRA of about the
same parameter count. Then, in alternating rounds, each a fresh process and the whole command:

* ``cp -r BASE OUT`` — the floor: the bytes of the checkpoint copied once;
* ``spra-tools apply BASE A.spra -o OUT`` — process start, reading, checks and writing included;
* transformers + peft-sparta's loader (``SpaRTAforCausalLM``: load the base, merge the deltas),
  then ``save_pretrained``;
* transformers + PEFT: load the base and the LoRA, ``merge_and_unload``, ``save_pretrained``.

Page cache: warm — the base is read once before every command, so every command reads it from
memory; outputs go to the page cache (no fsync, as `cp` does) and are flushed with `sync` and
deleted between commands, outside the timings. Prints one markdown table: wall-clock medians and
minima, CPU time (user + system, all threads; steadier than wall-clock on a shared machine), ratios
to `cp -r`, and the speed-up of apply over each load + merge + save. A row for `spra-tools --help`
shows what process start and imports alone cost.

    python scripts/bench_file_apply.py                        # ~1.1 GB, 0.1 %, 5 rounds
    python scripts/bench_file_apply.py --rounds 9 --skip-peft  # only cp and apply, more rounds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SPARTA_MERGE = """
import sys
from peft_sparta import SpaRTAforCausalLM
SpaRTAforCausalLM(sys.argv[1]).save_pretrained(sys.argv[2])
"""

LORA_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3])
"""


def build(args) -> dict:
    """The base, the adapters and their counts, built once per shape under args.dir."""
    import torch
    import transformers

    root = Path(args.dir)
    tag = f"h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}"
    base, spra, sparta, lora = root / f"base-{tag}", root / f"a-{tag}-{args.density:g}.spra", None, None
    sparta, lora = root / f"sparta-{tag}-{args.density:g}", root / f"lora-{tag}-{args.density:g}"
    meta = root / f"meta-{tag}-{args.density:g}.json"
    if meta.is_file() and base.is_dir() and spra.is_file():
        return json.loads(meta.read_text())
    root.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.disable_progress_bar()
    config = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 512),
        vocab_size=args.vocab,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    print(f"building the base ({tag}) ...", file=sys.stderr)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    shutil.rmtree(base, ignore_errors=True)
    model.save_pretrained(base, max_shard_size=args.shard_size)

    from spra_tools.algebra.convert import write_peft_sparta
    from spra_tools.checkpoint import open_checkpoint
    from spra_tools.surgery import create_adapter

    print("building the adapters ...", file=sys.stderr)
    ckpt = open_checkpoint(base)
    adapter = create_adapter(ckpt, args.density, 7, targets=("all-linear",))
    gen = torch.Generator().manual_seed(1)
    for d in adapter.deltas.values():
        d.values = (torch.randn(d.count, generator=gen) * 1e-2).to(torch.bfloat16)
    adapter.save(spra, overwrite=True)
    write_peft_sparta(adapter, sparta, str(base.resolve()), ckpt, overwrite=True)

    import peft

    # PEFT's LoRA of the nearest rank to the same parameter count: r * (in + out) per linear.
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules() if _adapted_linear(n, m))
    rank = max(1, round(adapter.num_values / per_rank))
    lora_config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
    peft.get_peft_model(model, lora_config).save_pretrained(lora)
    info = {
        "base": str(base),
        "spra": str(spra),
        "sparta": str(sparta),
        "lora": str(lora),
        "bytes": sum(p.stat().st_size for p in base.iterdir()),
        "shards": len(list(base.glob("*.safetensors"))),
        "values": adapter.num_values,
        "tensors": len(adapter.deltas),
        "lora_rank": rank,
        "lora_params": rank * per_rank,
    }
    meta.write_text(json.dumps(info))
    return info


def _adapted_linear(name: str, module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) and "lm_head" not in name


def spra_tools_command() -> list[str]:
    """The console script beside this interpreter, as a user runs it (else ``python -m spra_tools``)."""
    script = Path(sys.executable).with_name("spra-tools")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "spra_tools"]


def read_through(path: Path) -> None:
    """Read every file under `path` (puts it in the page cache)."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(16 << 20):
                    pass


def run(command: list[str], out: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one command, from process start to exit, CPU being user + system of
    the process and its threads; the output is then flushed and removed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    os.sync()
    shutil.rmtree(out, ignore_errors=True)
    return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/spra-bench-file-apply", help="where the inputs are cached and outputs go")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-size", default="400MB")
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-peft", action="store_true", help="time only cp -r and spra-tools apply")
    args = ap.parse_args()
    info = build(args)
    base, out = Path(info["base"]), Path(args.dir) / "out"
    shutil.rmtree(out, ignore_errors=True)
    py = sys.executable
    commands = {
        "cp -r BASE OUT": ["cp", "-r", str(base), str(out)],
        "spra-tools apply BASE A.spra -o OUT": [
            *spra_tools_command(),
            "apply",
            str(base),
            info["spra"],
            "-o",
            str(out),
        ],
        "spra-tools --help (process start and imports alone)": [*spra_tools_command(), "--help"],
    }
    if not args.skip_peft:
        commands["transformers + peft-sparta loader: load, merge, save_pretrained"] = [
            py, "-c", SPARTA_MERGE, info["sparta"], str(out)
        ]  # fmt: skip
        commands[f"transformers + PEFT LoRA r={info['lora_rank']}: load, merge_and_unload, save_pretrained"] = [
            py, "-c", LORA_MERGE, str(base), info["lora"], str(out)
        ]  # fmt: skip
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
    for r in range(args.rounds):
        for what, command in commands.items():
            read_through(base)
            times[what].append(run(command, out))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v[-1][0]:.2f}" for v in times.values()), file=sys.stderr)

    import numpy
    import torch

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    load = os.getloadavg()
    print(
        f"# bench_file_apply — {datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end), "
        f"torch {torch.__version__}, numpy {numpy.__version__}, commit {commit.stdout.strip() or '?'}"
    )
    print(
        f"\nLlama shape hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab "
        f"{args.vocab}: {info['bytes'] / 1e9:.2f} GB bf16 in {info['shards']} shards; all-linear seeded adapter at "
        f"{args.density:g}: {info['values']:,} values in {info['tensors']} tensors (LoRA r={info['lora_rank']}: "
        f"{info['lora_params']:,} parameters). Page cache warm (base read before each command; outputs "
        f"not synced inside the timing). {args.rounds} alternating rounds, each command a fresh process.\n"
    )
    print("| command | wall, median | wall, min | wall / cp -r | CPU, median | CPU / cp -r | apply faster by |")
    print("|---|---|---|---|---|---|---|")
    cp, apply = times["cp -r BASE OUT"], times["spra-tools apply BASE A.spra -o OUT"]
    cp_wall, cp_cpu = (statistics.median(t[i] for t in cp) for i in (0, 1))
    apply_wall = statistics.median(t[0] for t in apply)
    for what, ts in times.items():
        wall, cpu = (statistics.median(t[i] for t in ts) for i in (0, 1))
        faster = f"{wall / apply_wall:.1f}x" if what.startswith("transformers") else "—"
        print(
            f"| {what} | {wall:.2f} s | {min(t[0] for t in ts):.2f} s | {wall / cp_wall:.2f} | {cpu:.2f} s "
            f"| {cpu / cp_cpu:.2f} | {faster} |"
        )


if __name__ == "__main__":
    main()
