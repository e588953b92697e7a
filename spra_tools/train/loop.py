"""The bundled training loop behind `spra-tools train`: one `TrainConfig` in, one `.spra` out.

    result = train(TrainConfig.resolve("run.yaml", {"steps": 200}))

Causal-LM SFT or sequence classification on a Hugging Face base: the base's own tokenizer, a
SparseModel (seeded support; a classification head trains densely), SparseAdamW with warm-up and a
cosine / linear / constant schedule, gradient accumulation, evaluation and early stopping (the best
adapter is kept), and checkpoints that make `--resume` bit-exact: master deltas, moments, the
data position and the evaluation bookkeeping, in safetensors + JSON (no pickle); the RNG is seeded
per step, so a resumed step draws what the uninterrupted one did.
Under torchrun every rank trains on its slice of each global batch; DDP all-reduces the delta
gradients; rank 0 writes. Ctrl-C finishes the current step, writes a checkpoint and stops.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from ..errors import SpraError
from ..fsutil import atomic_path, check_output
from .config import TrainConfig, lr_at
from .data import Batches, eval_batches, tokenize
from .monitor import Monitor, classification_metrics
from .sparse_model import SparseAdamW, SparseModel

# Settings that may differ between a run and its resumption (they change nothing it computes).
_RESUMABLE = ("output", "resume", "log_dir", "checkpoint_dir", "checkpoint_every", "overwrite")


def _settings(config: TrainConfig) -> dict:
    """The config less `_RESUMABLE`: what a checkpoint must match and an adapter records."""
    return {k: v for k, v in config.to_dict().items() if k not in _RESUMABLE}


STATE, TENSORS = "state.json", "state.safetensors"


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def train(config: TrainConfig, echo=click.echo, progress: bool = True, on_step=None) -> dict:
    """Run `config`; return the summary (also printed). `on_step(step)` is called after each
    optimizer step (a KeyboardInterrupt raised there acts as Ctrl-C)."""
    dist = _init_distributed(config)
    try:
        return _train(config, dist, echo if dist.main else (lambda *_: None), progress, on_step)
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _init_distributed(config: TrainConfig) -> _Dist:
    """torchrun's rank and world (one process: a trivial _Dist); NCCL when the run is on GPUs, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Dist()
    d = _Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    on_gpu = _device(config, d).type == "cuda"
    if on_gpu:
        torch.cuda.set_device(d.local_rank)
    torch.distributed.init_process_group("nccl" if on_gpu else "gloo")
    # Rank 0 builds a missing compiled extension first; the others then load it from the cache.
    from .. import ops

    if d.rank == 0:
        for kind in ("cpu", "cuda") if on_gpu else ("cpu",):
            ops.backend_for(kind)
    torch.distributed.barrier()
    return d


def _device(config: TrainConfig, dist: _Dist) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise SpraError("--device cuda: no CUDA device is visible")
    if config.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", dist.local_rank)


def _load_tokenizer(base_dir: Path):
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError, TypeError) as e:
        raise SpraError(f"the base has no usable tokenizer ({str(e).splitlines()[0][:120]})", base_dir) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _load_model(config: TrainConfig, base_dir: Path, device, id2label, pad_id: int):
    import transformers

    dtype = torch.bfloat16 if config.dtype == "bf16" else torch.float32
    torch.manual_seed(config.seed)  # a new classification head starts from the same values every run
    kwargs = dict(dtype=dtype)
    if config.task == "seq-cls":
        kwargs.update(num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()})
        auto = transformers.AutoModelForSequenceClassification
    else:
        auto = transformers.AutoModelForCausalLM
    try:
        model = auto.from_pretrained(base_dir, **kwargs)
    except (OSError, ValueError) as e:
        raise SpraError(f"cannot load the base with transformers ({str(e).splitlines()[0][:160]})", base_dir) from None
    model.config.pad_token_id = pad_id
    return model.to(device)


def _head_patterns(model) -> list[str]:
    """Regexes of the new classification head's tensors (trained densely, stored whole)."""
    names = [n for n, _ in model.named_parameters() if n.split(".")[0] in ("score", "classifier")]
    return [f"^{re.escape(n)}$" for n in names]


def _train(config: TrainConfig, dist: _Dist, echo, progress: bool, on_step) -> dict:
    if dist.main:
        check_output(config.output, config.overwrite)
    device = _device(config, dist)
    from ..checkpoint import open_checkpoint

    checkpoint = open_checkpoint(config.base)  # a local directory, or the Hub through its cache
    base_dir = checkpoint.path if checkpoint.path.is_dir() else checkpoint.path.parent
    tokenizer = _load_tokenizer(base_dir)
    # Data before the model: a malformed file fails in seconds.
    train_data = tokenize(config.data, tokenizer, config.task, config.max_length, config.packing)
    label2id = {v: k for k, v in train_data.id2label.items()} if train_data.id2label else None
    eval_data = None
    if config.eval_data:
        eval_data = tokenize(config.eval_data, tokenizer, config.task, config.max_length, False, label2id)
    model = _load_model(config, base_dir, device, train_data.id2label, tokenizer.pad_token_id)
    echo(
        f"data: {train_data.records:,} records -> {len(train_data.input_ids):,} examples, {train_data.tokens:,} tokens"
        + (f" ({train_data.truncated:,} truncated to {config.max_length})" if train_data.truncated else "")
        + (f"; eval: {len(eval_data.input_ids):,} examples" if eval_data else "")
    )

    dense = _head_patterns(model) if config.task == "seq-cls" else ()
    sm = SparseModel(model, config.density, config.seed, config.targets, config.exclude, dense=dense)
    if config.gradient_checkpointing:  # non-reentrant: the deltas are not inputs of the checkpointed blocks
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = SparseAdamW(sm, config.lr, config.betas, config.eps, config.weight_decay, config.max_grad_norm or None)
    batches = Batches(train_data, config.batch_size, config.seed, tokenizer.pad_token_id, config.task,
                      rank=dist.rank, world_size=dist.world)  # fmt: skip
    total = config.total_steps(batches.steps_per_epoch)
    forward = sm
    if dist.world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            sm, device_ids=[device.index] if device.index is not None else None
        )
    n_values = sum(p.numel() for p in sm.parameters())
    echo(f"model: {len(list(sm.sites()))} tensors adapted, {n_values:,} trainable values; {total} steps on {device}"
         + (f" x {dist.world} processes" if dist.world > 1 else ""))  # fmt: skip

    bookkeeping = {"step": 0, "best": None, "best_step": None, "stale": 0, "tokens": 0}
    best_values: dict[str, torch.Tensor] | None = None
    if config.resume:
        restored = _load_checkpoint(config, sm, optimizer, batches, device)
        if restored is None:
            echo(f"resume: no checkpoint in {config.checkpoint_dir}; starting from step 0")
        else:
            bookkeeping, best_values = restored
            echo(f"resume: continuing from step {bookkeeping['step']}")
    start = bookkeeping["step"]

    def evaluate(step: int) -> dict:
        metrics = _evaluate(sm, eval_data, config, tokenizer.pad_token_id, device)
        improved = monitor.log_eval(step, metrics)
        if improved:
            bookkeeping.update(best=metrics, best_step=step, stale=0)
            nonlocal best_values
            best_values = {n: d.detach().clone() for n, d, *_ in sm.sites()}
        else:
            bookkeeping["stale"] += 1
        return metrics

    stopped_early = interrupted = False
    t0 = time.perf_counter()
    with Monitor(config.log_dir, total, rank0=dist.main, echo=echo, progress=progress,
                 resume_step=start if config.resume else None) as monitor:  # fmt: skip
        step = start
        position = batches.state_dict()  # the data position of the last completed step: what a checkpoint saves
        try:
            while step < total:
                torch.manual_seed(config.seed * 1_000_003 + step)  # dropout etc.: the same at each step on resume
                loss_sum, tokens = torch.zeros((), device=device), 0
                for micro in range(config.grad_accum):
                    batch = {k: v.to(device) for k, v in next(batches).items()}
                    sync = micro == config.grad_accum - 1 or dist.world == 1
                    with _no_sync(forward, not sync):
                        loss = forward(**batch).loss / config.grad_accum
                        loss.backward()
                    loss_sum += loss.detach()
                    tokens += int(batch["attention_mask"].sum())
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, config)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bookkeeping["step"] = step
                position = batches.state_dict()
                if dist.world > 1:
                    torch.distributed.all_reduce(loss_sum)
                    loss_sum /= dist.world
                    tokens_t = torch.tensor(tokens, device=device)
                    torch.distributed.all_reduce(tokens_t)
                    tokens = int(tokens_t)
                bookkeeping["tokens"] += tokens
                norm = optimizer.last_grad_norm
                monitor.log_train(step, float(loss_sum), lr_at(step - 1, total, config), tokens,
                                  None if norm is None else float(norm))  # fmt: skip
                if eval_data is not None and config.eval_every and step % config.eval_every == 0 and step < total:
                    evaluate(step)
                    if config.early_stopping and bookkeeping["stale"] >= config.early_stopping:
                        stopped_early = True
                        echo(f"early stopping at step {step}: {config.early_stopping} evaluations without improvement")
                        break
                if config.checkpoint_dir and config.checkpoint_every and step % config.checkpoint_every == 0:
                    _save_checkpoint(config, sm, optimizer, position, bookkeeping, best_values, dist)
                if on_step is not None:
                    on_step(step)
        except KeyboardInterrupt:
            interrupted = True
        if interrupted:
            if config.checkpoint_dir:
                _save_checkpoint(config, sm, optimizer, position, bookkeeping, best_values, dist)
                raise SpraError(f"interrupted after step {step}; checkpoint written: continue with --resume",
                                config.checkpoint_dir) from None  # fmt: skip
            raise SpraError(f"interrupted after step {step} (no --checkpoint-dir, nothing saved)") from None
        if eval_data is not None and not stopped_early and (bookkeeping["best_step"] != step):
            evaluate(step)
        if config.checkpoint_dir:
            _save_checkpoint(config, sm, optimizer, position, bookkeeping, best_values, dist)
        elapsed = time.perf_counter() - t0

    if best_values is not None:  # the best evaluated adapter, not merely the last
        with torch.no_grad():
            for name, delta, *_ in sm.sites():
                delta.copy_(best_values[name])
        sm.sync()
    values_dtype = torch.float32 if config.values_dtype == "fp32" else torch.bfloat16
    task = {"type": config.task}
    if train_data.id2label:
        task["id2label"] = {str(k): v for k, v in train_data.id2label.items()}
    provenance = {
        "config": _settings(config),
        "steps": step,
        "tokens": bookkeeping["tokens"],
        "best_eval": None if bookkeeping["best"] is None else {"step": bookkeeping["best_step"], **bookkeeping["best"]},
        "data": {
            "records": train_data.records,
            "examples": len(train_data.input_ids),
            "truncated": train_data.truncated,
        },
        "tool": "spra-tools train",
    }
    if dist.main:
        sm.save(config.output, values_dtype, overwrite=config.overwrite, provenance=provenance, task=task)
    if dist.world > 1:
        torch.distributed.barrier()
    text, summary = monitor.summary(config.output if dist.main else None)
    summary["elapsed_s"] = elapsed
    for line in text.splitlines():
        echo(line)
    return summary


class _no_sync:
    """DDP's no_sync for all but the last micro-batch of an accumulated step; nothing otherwise."""

    def __init__(self, module, active: bool):
        self.cm = module.no_sync() if active and hasattr(module, "no_sync") else None

    def __enter__(self):
        return self.cm.__enter__() if self.cm else None

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc) if self.cm else False


@torch.no_grad()
def _evaluate(sm: SparseModel, data, config: TrainConfig, pad_id: int, device) -> dict:
    """Token-weighted mean loss (causal-lm), or mean loss, accuracy and macro F1 (seq-cls)."""
    model = sm.model
    was_training = model.training
    model.eval()
    loss_sum, weight, predictions, labels = 0.0, 0, [], []
    for batch in eval_batches(data, config.batch_size, pad_id, config.task):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        if config.task == "seq-cls":
            n = batch["labels"].numel()
            predictions += out.logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
        else:
            n = int((batch["labels"][:, 1:] != -100).sum())
        loss_sum += float(out.loss) * n
        weight += n
    model.train(was_training)
    metrics = {"loss": loss_sum / max(weight, 1)}
    if config.task == "seq-cls":
        metrics.update(classification_metrics(predictions, labels, len(data.id2label)))
    return metrics


# --- checkpoints: safetensors for tensors, JSON for the rest -----------------------------------


def _save_checkpoint(config, sm, optimizer, position: dict, bookkeeping, best_values, dist: _Dist) -> None:
    if not dist.main:
        return
    from safetensors.torch import save_file

    tensors, steps = {}, {}
    for name, delta, *_ in sm.sites():
        state = optimizer.state.get(delta, {})
        steps[name] = state.get("step", 0)
        tensors[f"delta/{name}"] = delta.detach().cpu().contiguous()
        if state:
            tensors[f"exp_avg/{name}"] = state["exp_avg"].cpu().contiguous()
            tensors[f"exp_avg_sq/{name}"] = state["exp_avg_sq"].cpu().contiguous()
        if best_values is not None:
            tensors[f"best/{name}"] = best_values[name].cpu().contiguous()
    state = {
        "config": _settings(config),
        "bookkeeping": bookkeeping,
        "optimizer_steps": steps,
        "batches": position,
    }
    target = Path(config.checkpoint_dir) / "last"
    Path(config.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    with atomic_path(target, overwrite=True, directory=True) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / STATE).write_text(json.dumps(state, indent=1))


def _load_checkpoint(config, sm, optimizer, batches, device):
    """Restore a run from checkpoint_dir/last; None when there is none."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = Path(config.checkpoint_dir) / "last"
    if not (where / STATE).is_file():
        return None
    try:
        state = json.loads((where / STATE).read_text())
        tensors = load_file(str(where / TENSORS))
    except (OSError, ValueError, SafetensorError) as e:
        raise SpraError(f"cannot read the checkpoint ({e.__class__.__name__}: {str(e)[:100]})", where) from None
    if not isinstance(state, dict):
        raise SpraError(f"the checkpoint's {STATE} is not an object", where)
    saved = state.get("config", {})
    current = _settings(config)
    changed = sorted(k for k in current if saved.get(k) != current[k])
    if changed:
        raise SpraError(f"the checkpoint was made with different settings ({', '.join(changed)}); "
                        "resume with the same ones", where)  # fmt: skip
    try:
        return _restore(state, tensors, sm, optimizer, batches, device)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:  # damaged: the run stops here
        raise SpraError(f"the checkpoint is incomplete or damaged ({e.__class__.__name__}: {str(e)[:100]})",
                        where) from None  # fmt: skip


def _restore(state: dict, tensors: dict, sm, optimizer, batches, device) -> tuple[dict, dict | None]:
    """Load a checkpoint's deltas, moments and data position; return its bookkeeping and the best
    deltas, if kept."""
    best = None
    with torch.no_grad():
        for name, delta, *_ in sm.sites():
            delta.copy_(tensors[f"delta/{name}"])
            step = state["optimizer_steps"].get(name, 0)
            if step:
                optimizer.state[delta] = {
                    "step": step,
                    "exp_avg": tensors[f"exp_avg/{name}"].to(device),
                    "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].to(device),
                }
            if f"best/{name}" in tensors:
                best = best or {}
                best[name] = tensors[f"best/{name}"].to(device)
    sm.sync()
    batches.load_state_dict(state["batches"])
    return dict(state["bookkeeping"]), best
