"""What the user sees of a training run: a progress bar, a metrics log, TensorBoard events, a plot, a summary.

    with Monitor(log_dir, total_steps, rank0=rank == 0) as mon:
        ...; mon.log_train(step, loss, lr, tokens)          # after each optimizer step
        ...; improved = mon.log_eval(step, {"loss": 1.9, "accuracy": 0.7})
    text, info = mon.summary("task.spra")

`step` is the number of optimizer steps done (1 after the first; the learning-rate schedule counts
from 0, so the rate logged at step s is `lr_at(s - 1, ...)`). `log_dir/metrics.jsonl` is the record
of the run, one JSON object per line, flushed as written so that it survives a crash and a resumed
run continues it: `{"step": 120, "split": "train", "loss": 2.1, "lr": 0.0002, "tokens": 4096,
"time": 1790000000.0}` (an eval line holds the evaluation's metrics; time is Unix seconds).
TensorBoard events (when `tensorboard` is installed) and `curves.png` (when matplotlib is) are views
of the same numbers. Only rank 0 writes; other ranks keep the same bookkeeping (best evaluation,
counts) so that decisions taken from it agree across ranks.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import click
import numpy as np

from ..errors import SpraError
from ..fsutil import atomic_path, human_size

METRICS = "metrics.jsonl"
CURVES = "curves.png"


class Monitor:
    """Progress bar, metrics.jsonl, TensorBoard and curves.png of one run (module docstring).

    `resume_step`: None for a fresh run (an earlier run's metrics.jsonl in `log_dir` is replaced and
    its TensorBoard events are hidden); else the step of the checkpoint resumed from: log lines after
    it are dropped and the log continues, so a resumed run's log has no duplicate steps.
    `best`: (step, metrics) of the best evaluation before the resume, which later ones must beat.
    """

    def __init__(self, log_dir: str | os.PathLike | None, total_steps: int, rank0: bool = True,
                 echo: Callable[[str], None] = click.echo, progress: bool = True,
                 resume_step: int | None = None, best: tuple[int, dict] | None = None):  # fmt: skip
        self.start_step = resume_step or 0
        self.step = self.start_step
        self.tokens = 0  # logged since this Monitor started (so after the resume, if any)
        self.computed = 0  # the same, padding included
        self.best: dict | None = None  # {"metric", "value", "step"}
        if best is not None:
            step, metrics = best
            name, value = _score(metrics)
            self.best = {"metric": name, "value": value, "step": step}
        self.notes: list[str] = []
        self._rank0 = rank0
        self._echo = echo
        self._t0 = time.perf_counter()
        self._t1: float | None = None
        self._log = self._writer = self._bar = None
        self._dir = None if log_dir is None else os.fspath(log_dir)
        if not rank0:
            return
        if self._dir is not None:
            self._open_outputs(resume_step)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=self.start_step, unit="step", file=sys.stderr, dynamic_ncols=True
            )

    def _open_outputs(self, resume_step: int | None) -> None:
        path = os.path.join(self._dir, METRICS)
        try:
            os.makedirs(self._dir, exist_ok=True)
            if resume_step is not None and os.path.exists(path):
                _truncate_log(path, resume_step)
            self._log = open(path, "a" if resume_step is not None else "w", encoding="utf-8")
        except OSError as e:
            raise SpraError(f"cannot write the training log ({e.strerror or e})", self._dir) from None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            # A START event at purge_step hides earlier events at steps >= it from TensorBoard:
            # everything for a fresh run, the steps redone for a resumed one.
            purge = 0 if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(self._dir, purge_step=purge)
        else:
            self.notes.append("TensorBoard events skipped: the tensorboard package is not installed")
        if importlib.util.find_spec("matplotlib") is None:
            self.notes.append(f"{CURVES} skipped: matplotlib is not installed")

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log_train(self, step: int, loss: float, lr: float, tokens: int, grad_norm: float | None = None,
                  computed: int | None = None) -> None:  # fmt: skip
        """Record optimizer step `step` (1-based): its loss, learning rate, tokens (all ranks together;
        `computed` counts the padding too) and, if clipping computed it, the gradient norm before clipping."""
        loss, lr, tokens = float(loss), float(lr), int(tokens)
        self.tokens += tokens
        advance, self.step = step - self.step, step
        record = {"loss": loss, "lr": lr, "tokens": tokens}
        if computed is not None:
            self.computed += int(computed)
            record["computed_tokens"] = int(computed)
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        self._write(step, "train", record)
        if self._bar is not None:
            rate = self.tokens / max(time.perf_counter() - self._t0, 1e-9)
            self._bar.set_postfix_str(f"loss={loss:.4g} lr={lr:.2e} tok/s={rate:,.0f}", refresh=False)
            self._bar.update(advance)

    def log_eval(self, step: int, metrics: dict[str, float], baseline: bool = False) -> bool:
        """Record an evaluation after `step` optimizer steps; True when it is the best so far.

        Best is the lowest "loss" when the metrics have one, else the highest "accuracy". A
        `baseline` (the model before training, at step 0) is logged and shown but never the best:
        the best is an adapter that training made."""
        metrics = {k: float(v) for k, v in metrics.items()}
        self._write(step, "eval", metrics)
        improved = False
        if baseline:
            self._show(f"step {step}: eval (baseline) " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            return improved
        name, value = _score(metrics)
        if math.isfinite(value):
            best = None if self.best is None else self.best["value"]
            improved = best is None or (value < best if name == "loss" else value > best)
            if improved:
                self.best = {"metric": name, "value": value, "step": step}
        self._show(f"step {step}: eval " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return improved

    def _show(self, line: str) -> None:
        if not self._rank0:
            return
        if self._bar is not None:
            with self._bar.external_write_mode(file=sys.stderr):
                self._echo(line)
        else:
            self._echo(line)

    def close(self) -> None:
        """Stop the clock, close the bar and files and draw curves.png; safe to call twice."""
        if self._t1 is not None:
            return
        self._t1 = time.perf_counter()
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._log is not None:
            self._log.close()
            if importlib.util.find_spec("matplotlib") is not None:
                try:
                    plot_curves(os.path.join(self._dir, METRICS), os.path.join(self._dir, CURVES))
                except OSError as e:  # a plot is not worth failing (or hiding the error of) a run
                    self.notes.append(f"{CURVES} not written ({e.strerror or e})")

    def summary(self, adapter_path: str | os.PathLike | None = None) -> tuple[str, dict]:
        """Text lines for the user and the same facts as a dict; call after `close` (the `with` block)."""
        wall = (self._t1 or time.perf_counter()) - self._t0
        memory, memory_kind = _peak_memory()
        adapter = None if adapter_path is None else os.fspath(adapter_path)
        adapter_bytes = os.path.getsize(adapter) if adapter is not None and os.path.isfile(adapter) else None
        info = {
            "steps": self.step,
            "resumed_from": self.start_step or None,
            "tokens": self.tokens,
            "wall_time_s": wall,
            "tokens_per_s": self.tokens / wall if wall > 0 else 0.0,
            "padding": 1 - self.tokens / self.computed if self.computed else None,
            "peak_memory_bytes": memory,
            "peak_memory_kind": memory_kind,
            "adapter": adapter,
            "adapter_bytes": adapter_bytes,
            "best_eval": self.best,
            "log_dir": self._dir if self._rank0 else None,
            "notes": list(self.notes),
        }
        resumed = f" (resumed at step {self.start_step})" if self.start_step else ""
        lines = [
            f"steps:        {self.step}{resumed}",
            f"tokens:       {self.tokens:,}",
            f"wall time:    {_duration(wall)}",
            f"throughput:   {info['tokens_per_s']:,.0f} tokens/s",
        ]
        if info["padding"] is not None:
            lines.append(f"padding:      {info['padding']:.1%} of the tokens computed")
        if memory is not None:
            kind = "CUDA allocated" if memory_kind == "cuda" else "process RSS"
            lines.append(f"peak memory:  {human_size(memory)} ({kind})")
        if adapter is not None:
            size = f" ({adapter_bytes:,} bytes, {human_size(adapter_bytes)})" if adapter_bytes is not None else ""
            lines.append(f"adapter:      {adapter}{size}")
        if self.best is not None:
            b = self.best
            lines.append(f"best eval:    {b['metric']} {b['value']:.4g} at step {b['step']}")
        if info["log_dir"] is not None:
            lines.append(f"logs:         {self._dir}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines), info

    def _write(self, step: int, split: str, values: dict) -> None:
        if self._log is not None:
            # Strict JSON has no NaN or Infinity: a diverged loss is written as null.
            clean = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in values.items()}
            record = {"step": step, "split": split, **clean, "time": round(time.time(), 3)}
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(f"{split}/{k}", v, step)


def _score(metrics: dict[str, float]) -> tuple[str | None, float]:
    """What decides the best evaluation: the "loss" (lower is better), else the "accuracy"; NaN when neither."""
    name = "loss" if "loss" in metrics else "accuracy" if "accuracy" in metrics else None
    return name, float(metrics[name]) if name is not None else math.nan


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a crash mid-write) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def plot_curves(log_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Draw train (and eval) loss versus step from a metrics.jsonl, eval accuracy on a second axis."""
    # Figure without pyplot: no global backend is switched and no window can open (Agg renders PNG).
    from matplotlib.figure import Figure

    records = read_log(log_path)

    def series(split, key):
        points = [(r["step"], r[key]) for r in records if r.get("split") == split and r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.plot(*series("train", "loss"), lw=0.8, color="tab:blue", label="train loss")
    steps, values = series("eval", "loss")
    if steps:
        ax.plot(steps, values, "o-", color="tab:orange", label="eval loss")
    handles, labels = ax.get_legend_handles_labels()
    steps, values = series("eval", "accuracy")
    if steps:
        ax2 = ax.twinx()
        ax2.set_ylabel("accuracy")
        ax2.plot(steps, values, "s--", color="tab:green", label="eval accuracy")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:  # above the axes, where no curve can hide it
        fig.legend(handles, labels, loc="outside upper center", ncols=len(handles), frameon=False)
    with atomic_path(png_path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro F1 of integer class predictions (lists, arrays or CPU tensors).

    Macro F1 averages the per-class F1 = 2TP / (2TP + FP + FN) over the classes that occur in
    `labels` or `predictions` (as scikit-learn does), so a class absent from a small evaluation set
    does not count as a zero.
    """
    p = np.asarray(predictions, dtype=np.int64).reshape(-1)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"need as many predictions as labels, and some: got {p.size} and {y.size}")
    if min(p.min(), y.min()) < 0 or max(p.max(), y.max()) >= num_labels:
        raise ValueError(f"classes must be in [0, {num_labels})")
    tp = np.bincount(y[p == y], minlength=num_labels)
    predicted = np.bincount(p, minlength=num_labels)  # TP + FP
    actual = np.bincount(y, minlength=num_labels)  # TP + FN
    present = (predicted + actual) > 0
    f1 = 2 * tp[present] / (predicted[present] + actual[present])
    return {"accuracy": float((p == y).mean()), "f1": float(f1.mean())}


def _truncate_log(path: str, last_step: int) -> None:
    """Keep only the records up to `last_step` (the resumed checkpoint's); rewritten atomically."""
    kept = [r for r in read_log(path) if r["step"] <= last_step]
    with atomic_path(path, overwrite=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)


def _peak_memory() -> tuple[int | None, str | None]:
    """Peak CUDA memory allocated by torch when CUDA was used, else the process's peak RSS."""
    torch = sys.modules.get("torch")  # a run that never imported torch used no CUDA
    if torch is not None and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "cuda"
    try:
        import resource
    except ImportError:  # Windows
        return None, None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024), "rss"  # bytes on macOS, KiB on Linux


def _duration(seconds: float) -> str:
    m, s = divmod(seconds, 60)
    h, m = divmod(int(m), 60)
    return f"{h}:{m:02d}:{s:04.1f}" if h else f"{m}:{s:04.1f}" if m else f"{s:.1f} s"
