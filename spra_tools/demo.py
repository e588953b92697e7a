"""`spra-tools demo`: train (with the bundled `spra-tools train` loop), apply, verify and extract
an adapter on a tiny Llama built locally (no network, seconds on a CPU; testing.py builds it).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from .testing import CORPUS, build_tiny_model, build_word_tokenizer

TRAIN_STEPS = 40


def corpus_windows(length: int = 24, stride: int = 8) -> list[str]:
    """The corpus (testing.CORPUS), repeated, cut into overlapping windows of `length` words: one text each."""
    words = CORPUS.split() * 4
    return [" ".join(words[s : s + length]) for s in range(0, len(words) - length, stride)]


def run_demo(workdir: str | None, echo=print) -> dict:
    import transformers

    from .adapter import Adapter
    from .algebra import diff_checkpoints
    from .checkpoint import open_checkpoint
    from .dtypes import bit_view
    from .surgery import apply_adapter, verify_adapter

    with tempfile.TemporaryDirectory(prefix="spra-demo-") as tmp:
        root = Path(workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        timings = {}

        def timed(key, fn, *a, **k):
            t0 = time.perf_counter()
            result = fn(*a, **k)
            timings[key] = time.perf_counter() - t0
            return result

        echo("1. building a tiny Llama locally (bf16, sharded safetensors)")
        build_tiny_model("llama", root / "base", shard_size="2MB", hidden=256, layers=4)
        base = open_checkpoint(root / "base")
        echo(f"   {len(base.shards)} shards, {base.numel:,} parameters")

        echo("2. spra-tools train: a seeded sparse adapter on an embedded corpus (all linears + lm_head, 5 %)")
        from .train.config import TrainConfig
        from .train.data import tokenize
        from .train.loop import train
        from .train.monitor import read_log

        build_word_tokenizer(CORPUS.split(), root / "base")
        windows = corpus_windows()
        (root / "corpus.jsonl").write_text("".join(json.dumps({"text": w}) + "\n" for w in windows))
        seeded_path = root / "task.spra"
        config = TrainConfig(
            base=str(root / "base"), data=str(root / "corpus.jsonl"), output=str(seeded_path), density=0.05,
            seed=1234, targets=("all-linear", r"lm_head\.weight$"), steps=TRAIN_STEPS, lr=1e-2, batch_size=8,
            schedule="constant", max_grad_norm=None, device="cpu", log_dir=str(root / "logs"), overwrite=True,
        )  # fmt: skip
        t0 = time.perf_counter()
        train(config, echo=lambda line: echo(f"   {line}"), progress=False)
        timings["train"] = time.perf_counter() - t0
        for row in read_log(root / "logs" / "metrics.jsonl"):
            if row["split"] == "train" and (row["step"] % 10 == 0 or row["step"] == 1):
                echo(f"   step {row['step']:>3}  loss {row['loss']:.3f}")
        adapter = Adapter.load(seeded_path)
        seeded_bytes = seeded_path.stat().st_size
        n = adapter.num_values
        echo(
            f"   {n:,} values in {len(adapter.deltas)} tensors -> {seeded_bytes:,} bytes ({seeded_bytes / n:.2f} B/value)"
        )

        echo("3. verifying and applying it -> merged checkpoint")
        assert not verify_adapter(base, Adapter.load(seeded_path))
        timed(
            "apply",
            apply_adapter,
            base,
            [(str(seeded_path), Adapter.load(seeded_path))],
            root / "merged",
            overwrite=True,
        )
        merged = open_checkpoint(root / "merged")
        wrong = verify_adapter(merged, adapter)
        echo(f"   verify against the merged model (a wrong base) finds {len(wrong)} mismatching tensors, as it should")

        echo("4. extracting the change back with diff (explicit support) and re-applying it")
        extracted, _ = timed("diff", diff_checkpoints, base, merged)
        extracted_path = root / "extracted.spra"
        extracted.save(extracted_path, overwrite=True)
        apply_adapter(base, [(str(extracted_path), Adapter.load(extracted_path))], root / "reapplied", overwrite=True)
        reapplied = open_checkpoint(root / "reapplied")
        identical = all(torch.equal(bit_view(merged.read(k)), bit_view(reapplied.read(k))) for k in merged.names())
        echo(f"   re-applied checkpoint bit-identical to the merged one: {identical}")

        echo("5. judging base and merged with transformers on the corpus")
        tokenizer = transformers.AutoTokenizer.from_pretrained(root / "base")
        batch = torch.tensor(tokenize(root / "corpus.jsonl", tokenizer, "causal-lm", 512).input_ids)  # as trained
        losses = {}
        for key in ("base", "merged"):
            model = transformers.AutoModelForCausalLM.from_pretrained(root / key, dtype=torch.float32)
            with torch.no_grad():
                losses[key] = model(input_ids=batch, labels=batch).loss.item()
        echo(f"   loss {losses['base']:.3f} (base) -> {losses['merged']:.3f} (merged)")

        extracted_bytes = extracted_path.stat().st_size
        echo("")
        echo("report")
        echo(f"  seeded adapter     {seeded_bytes:>9,} bytes  {seeded_bytes / n:5.2f} B/value")
        echo(f"  explicit (diff)    {extracted_bytes:>9,} bytes  {extracted_bytes / n:5.2f} B/value")
        echo(f"  peft-sparta layout {12 * n:>9,} bytes  12.00 B/value (int32 [nnz, 2] + fp32)")
        for key in ("train", "apply", "diff"):
            echo(f"  {key:<7} {timings[key] * 1000:8.1f} ms")
        if not identical or wrong == [] or not losses["merged"] < 0.6 * losses["base"]:
            raise RuntimeError("demo self-check failed")
        return {"bytes_per_value": seeded_bytes / n, "identical": identical, "timings": timings}
