"""Learning-rate sweep of `spra-tools train` on a real model: what the `--lr` default is chosen from.

    python scripts/sweep_lr.py BASE                                   # the default grid, prints a table
    python scripts/sweep_lr.py BASE --targets vo all-linear --lrs 1e-3 3e-3 1e-2 --steps 40

Each run is a causal-LM fine-tune on prose that ships with every Python (the paragraphs of the
interpreter's own documentation, `pydoc_data.topics`: real English text no model was tuned on
for this), evaluated on held-out paragraphs before the first step and every quarter of the run.
The table gives per targets preset, density and rate the eval loss at step 0, after the run, and
the best on the way; the rate to prefer is the one with the lowest final loss that did not diverge.
BASE is a model directory, e.g. one that `python scripts/example_models.py` prepared.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from spra_tools.train.config import TrainConfig
from spra_tools.train.loop import train


def write_corpus(directory: Path, eval_records: int) -> tuple[Path, Path]:
    """train.jsonl and eval.jsonl of {"text"} records: paragraphs of at least 20 words, in a fixed order."""
    from pydoc_data.topics import topics

    paragraphs = [
        " ".join(p.split()) for key in sorted(topics) for p in re.split(r"\n\s*\n", topics[key]) if len(p.split()) >= 20
    ]
    held_out, training = paragraphs[::8][:eval_records], [p for i, p in enumerate(paragraphs) if i % 8]
    paths = directory / "train.jsonl", directory / "eval.jsonl"
    for path, records in zip(paths, (training, held_out)):
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base")
    parser.add_argument("--targets", nargs="+", default=["vo", "all-linear"])
    parser.add_argument("--densities", nargs="+", type=float, default=[0.01])
    parser.add_argument("--lrs", nargs="+", type=float, default=[2e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--steps", nargs="+", type=int, default=[40])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-records", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="bf16 or fp32 (default: train's own default)")
    parser.add_argument("--json", help="Also write the rows to this file.")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="spra-sweep-") as tmp:
        tmp = Path(tmp)
        data, eval_data = write_corpus(tmp, args.eval_records)
        grid = [(s, t, d, lr) for s in args.steps for t in args.targets for d in args.densities for lr in args.lrs]
        for steps, targets, density, lr in grid:
            run = tmp / f"{steps}-{targets}-{density}-{lr}"
            run.mkdir()
            settings = dict(
                base=args.base, data=str(data), eval_data=str(eval_data), output=str(run / "a.spra"),
                targets=[targets], density=density, lr=lr, steps=steps, batch_size=args.batch_size,
                max_length=args.max_length, eval_every=max(1, steps // 4), log_dir=str(run / "logs"),
                device=args.device, seed=0,
            )  # fmt: skip
            if args.dtype:
                settings["dtype"] = args.dtype
            t0 = time.perf_counter()
            train(TrainConfig.from_dict(settings), echo=lambda *_: None, progress=False)
            evals = [
                r["loss"]
                for r in map(json.loads, (run / "logs" / "metrics.jsonl").read_text().splitlines())
                if r.get("split") == "eval"
            ]
            row = dict(targets=targets, density=density, lr=lr, steps=steps, eval_0=evals[0],
                       eval_end=evals[-1], eval_best=min(evals), seconds=time.perf_counter() - t0)  # fmt: skip
            rows.append(row)
            print(
                f"{steps:>5} {targets:>10}  {density:<7g} {lr:<8g} eval {row['eval_0']:.3f} -> {row['eval_end']:.3f}"
                f" (best {row['eval_best']:.3f})  {row['seconds']:.0f} s",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
