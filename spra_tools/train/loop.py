"""The bundled training loop behind `spra-tools train`: one `TrainConfig` in, one `.spra` out.

    result = train(TrainConfig.resolve("run.yaml", {"steps": 200}))

Causal-LM SFT or sequence classification on a Hugging Face base: the base's own tokenizer, a
SparseModel (seeded support; a classification head trains densely), SparseAdamW with warm-up and a
cosine / linear / constant schedule, gradient accumulation, evaluation (the base's first, at step
0) and early stopping (the best adapter is kept), and checkpoints that make `--resume` bit-exact
(`checkpoints`); the RNG is seeded per step, so a resumed step draws what the uninterrupted one did.
`_preflight` checks every path before anything loads, `_setup` builds what the steps use (`_Run`),
`_step` does one optimizer step and advances the `RunState`, which is what a checkpoint stores.
Under torchrun every rank trains on its slice of each global batch; DDP all-reduces the delta
gradients, or with --fsdp the base is sharded by FSDP2 (`distributed`); rank 0 writes. Ctrl-C finishes the current step, writes a checkpoint and stops.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from ..dtypes import TORCH_DTYPES
from ..errors import SpraError
from ..format import SHORT_DTYPES
from ..fsutil import check_output
from . import checkpoints
from .checkpoints import RunState
from .config import TrainConfig, lr_at
from .data import Batches, TokenizedData, check_source, eval_batches, tokenize
from .monitor import Monitor, classification_metrics
from .sparse_model import SparseAdamW, SparseModel


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
        _preflight(config, dist)
        # One run at a time in a checkpoint dir: two would overwrite each other's checkpoints.
        held = checkpoints.held(config.checkpoint_dir) if dist.main and config.checkpoint_dir else nullcontext()
        with held:
            return _train(config, dist, echo if dist.main else (lambda *_: None), progress, on_step)
    finally:
        if (dist.world > 1 or config.fsdp) and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _init_distributed(config: TrainConfig) -> _Dist:
    """torchrun's rank and world (one process: a trivial _Dist); NCCL when the run is on GPUs, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not config.fsdp:
        return _Dist()
    d = _Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    on_gpu = _device(config, d).type == "cuda"
    if on_gpu:
        torch.cuda.set_device(d.local_rank)
    if "MASTER_ADDR" in os.environ:
        torch.distributed.init_process_group("nccl" if on_gpu else "gloo")
    else:  # --fsdp in one process without torchrun: a group of one
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group("nccl" if on_gpu else "gloo", store=store, rank=0, world_size=1)
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
    if config.quantize:  # quantized as it loads, on the device (a bitsandbytes model cannot move later)
        from ..quantized import bnb_config

        kwargs.update(quantization_config=bnb_config(config.quantize, dtype), device_map={"": device})
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
    return model if config.quantize else model.to(device)


def _head_patterns(model, checkpoint) -> list[str]:
    """Regexes of the classification head's tensors (trained densely, stored whole): every parameter
    the task class adds around its base model (weights, biases, norms; one layer or several), and
    every parameter the checkpoint lacks (transformers initialized it anew)."""
    from ..names import NameMap

    names = NameMap(model, checkpoint.names())
    base = getattr(model, "base_model", model)
    inside = {id(p) for p in base.parameters()} if base is not model else set()
    head = [n for n, p in model.named_parameters() if id(p) not in inside or names.is_new(n)]
    return [f"^{re.escape(n)}$" for n in head]


@dataclass
class _Run:
    """What every step of a run uses, built once by `_setup`."""

    config: TrainConfig
    dist: _Dist
    device: torch.device
    pad_id: int
    train_data: TokenizedData
    eval_data: TokenizedData | None
    sm: SparseModel
    optimizer: SparseAdamW
    batches: Batches
    forward: torch.nn.Module  # sm, or its DDP wrapper
    total: int  # optimizer steps of the run
    base_weights: dict  # what a checkpoint records of the base, checked on resume (checkpoints.base_identity)
    padding_free: bool  # batches go to the model without their attention mask (see `_padding_free`)
    pad_to: int  # batch lengths are rounded up to a multiple of this
    pending: _StepLog | None = None  # the last step, logged once the next one is queued


@dataclass
class _StepLog:
    """What the log says of one step; its tensors are read only after the next step is queued, so
    the host never waits for the GPU mid-run."""

    step: int
    loss: torch.Tensor
    lr: float
    counts: torch.Tensor | tuple[int, int]  # (tokens, tokens computed): all ranks, on the device under DDP
    grad_norm: torch.Tensor | None

    def write(self, monitor: Monitor) -> None:
        tokens, computed = (int(c) for c in self.counts)
        norm = None if self.grad_norm is None else float(self.grad_norm)
        monitor.log_train(self.step, float(self.loss), self.lr, tokens, norm, computed)


def _preflight(config: TrainConfig, dist: _Dist) -> None:
    """Every path of the run and the checkpoint to resume, checked before anything heavy loads (a
    base may be gigabytes from the Hub): a typo or a mismatch fails in a second, naming the file."""
    check_source(config.data)
    if config.eval_data is not None:
        check_source(config.eval_data)
    if config.resume:
        checkpoints.check_resumable(config.checkpoint_dir, config.run_settings())
    if dist.main:
        check_output(config.output, config.overwrite, _inputs(config))
        for what, path in (("checkpoint directory", config.checkpoint_dir), ("log directory", config.log_dir)):
            if path is not None:
                _check_directory(path, what)


def _inputs(config: TrainConfig) -> tuple:
    """What the run reads: the output may not be, hold or lie inside any of them."""
    return (config.base, config.data, config.eval_data)


def _check_directory(path: str, what: str) -> None:
    """`path` is a writable directory, or one that can be made (checked without making it)."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SpraError(f"cannot be the {what}: {existing} is not a directory", path)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SpraError(f"the {what} is not writable ({existing})", path)


def _setup(config: TrainConfig, dist: _Dist, echo) -> _Run:
    """Tokenizer, data, model, SparseModel, optimizer and batches of `config`."""
    device = _device(config, dist)
    from ..checkpoint import open_checkpoint

    checkpoint = open_checkpoint(config.base)  # a local directory, or the Hub through its cache
    identity = checkpoints.base_identity(checkpoint)
    if config.resume:  # the settings were checked in `_preflight`; the base can be checked once open
        checkpoints.check_base(config.checkpoint_dir, identity)
    base_dir = checkpoint.path if checkpoint.path.is_dir() else checkpoint.path.parent
    tokenizer = _load_tokenizer(base_dir)
    train_data, eval_data = _load_data(config, tokenizer, echo)  # before the model: a bad file fails in seconds
    # Under FSDP2 the model loads on the host and moves to the device one sharded layer at a time.
    on = torch.device("cpu") if config.fsdp else device
    model = _load_model(config, base_dir, on, train_data.id2label, tokenizer.pad_token_id)
    sm = _sparse_model(config, model, checkpoint, device)
    optimizer = SparseAdamW(sm, config.lr, config.betas, config.eps, config.weight_decay, config.max_grad_norm or None)
    pad_to = _pad_to(config.max_length, device)
    batches = Batches(train_data, config.batch_size, config.seed, tokenizer.pad_token_id, config.task,
                      rank=dist.rank, world_size=dist.world, group_by_length=config.group_by_length,
                      pad_to=pad_to)  # fmt: skip
    total = config.total_steps(batches.steps_per_epoch)
    forward = sm
    if dist.world > 1 and not config.fsdp:
        forward = torch.nn.parallel.DistributedDataParallel(
            sm, device_ids=[device.index] if device.index is not None else None
        )
    n_values = sum(p.numel() for p in sm.parameters())
    echo(f"model: {len(list(sm.sites()))} tensors adapted, {n_values:,} trainable values; {total} steps on {device}"
         + (f" x {dist.world} processes" if dist.world > 1 else ""))  # fmt: skip
    return _Run(config, dist, device, tokenizer.pad_token_id, train_data, eval_data, sm, optimizer, batches,
                forward, total, identity, _padding_free(config, model), pad_to)  # fmt: skip


def _pad_to(max_length: int, device: torch.device) -> int:
    """On CUDA, batch lengths are rounded up to a multiple of 64 (or 8, or 1: never past
    --max-length). Few distinct lengths matter on Hopper, where SDPA prefers cuDNN's attention,
    which builds an execution plan on the host for each new sequence length: with lengths in steps
    of 8 nearly every step met a new one and took ~90 ms more than the same step at a fixed length
    (1B shape, H200, scripts/bench_loop.py); in steps of 64 at most max_length / 64 lengths ever
    occur, for ~5 % of the tokens in padding with length-grouped batches. Elsewhere no plan is
    built and every padded token is paid for: lengths are left as they are (short records rounded
    up to 64 were 88 % padding on the CPU)."""
    return next(m for m in (64, 8, 1) if max_length % m == 0) if device.type == "cuda" else 1


def _padding_free(config: TrainConfig, model) -> bool:
    """Whether causal-LM batches may drop their attention mask. They are right-padded, and in a
    decoder a position sees only those before it, so no real token ever attends to padding and the
    padded positions carry no loss: the losses and gradients are those of the masked batch. Without
    a mask, transformers runs causal attention (SDPA's flash kernel) instead of a masked kernel,
    which for ragged batches is several times slower."""
    return config.task == "causal-lm" and not getattr(model.config, "is_encoder_decoder", False)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on `device`; from pinned memory without blocking the host (a pageable copy would
    wait for every kernel queued before it)."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def _load_data(config: TrainConfig, tokenizer, echo) -> tuple[TokenizedData, TokenizedData | None]:
    """The training and evaluation examples (eval labels numbered as the training ones), reported."""
    train_data = tokenize(config.data, tokenizer, config.task, config.max_length, config.packing)
    label2id = {v: k for k, v in train_data.id2label.items()} if train_data.id2label else None
    eval_data = None
    if config.eval_data:
        eval_data = tokenize(config.eval_data, tokenizer, config.task, config.max_length, False, label2id)
    line = f"data: {_counts(train_data, config.max_length)}"
    if eval_data is not None:
        line += f"; eval: {_counts(eval_data, config.max_length)}"
    echo(line)
    return train_data, eval_data


def _counts(data: TokenizedData, max_length: int) -> str:
    """Records in, examples out, and what truncation did on the way: examples are never lost unsaid."""
    text = f"{data.records:,} records -> {len(data.input_ids):,} examples, {data.tokens:,} tokens"
    cut = [f"{data.truncated:,} truncated to --max-length {max_length}"] if data.truncated else []
    if data.dropped:
        cut.append(f"{data.dropped:,} dropped (truncation left them no token to learn)")
    return text + (f" ({', '.join(cut)})" if cut else "")


def _data_record(data: TokenizedData) -> dict:
    """What an adapter's provenance says of its training (or evaluation) data."""
    return {"records": data.records, "examples": len(data.input_ids), "truncated": data.truncated,
            "dropped": data.dropped}  # fmt: skip


def _sparse_model(config: TrainConfig, model, checkpoint, device: torch.device) -> SparseModel:
    """`model` made trainable at its seeded support (a classification head densely), in train mode,
    its adapter keyed by and fingerprinted against `checkpoint` (the full-precision base of a
    quantized model); with --fsdp sharded first."""
    dense = _head_patterns(model, checkpoint) if config.task == "seq-cls" else ()
    kind = SparseModel
    if config.fsdp:
        from .distributed import ShardedSparseModel, shard_model

        model, kind = shard_model(model, device), ShardedSparseModel
    sm = kind(model, config.density, config.seed, config.targets, config.exclude, dense=dense,
              base=checkpoint)  # fmt: skip
    if config.gradient_checkpointing:  # non-reentrant: the deltas are not inputs of the checkpointed blocks
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return sm


def _start(run: _Run, echo) -> RunState:
    """A fresh RunState, or the one of the checkpoint resumed (its deltas, moments and data position
    loaded into the run)."""
    config = run.config
    if config.resume:
        restored = checkpoints.load(config.checkpoint_dir, config.run_settings(), run.sm, run.optimizer,
                                    run.batches, run.device)  # fmt: skip
        if restored is not None:
            echo(f"resume: continuing from step {restored.step}")
            return restored
        echo(f"resume: no checkpoint in {config.checkpoint_dir}; starting from step 0")
    return RunState(position=run.batches.state_dict())


def _step(run: _Run, state: RunState) -> _StepLog:
    """One optimizer step (grad_accum micro-batches), queued without waiting for the GPU; advances
    `state` and returns what the log says of it."""
    config, dist = run.config, run.dist
    step = state.step
    torch.manual_seed(_step_seed(config.seed, step))  # dropout etc.: the same at each step on resume
    loss_sum, tokens, computed = torch.zeros((), device=run.device), 0, 0
    for micro in range(config.grad_accum):
        batch = next(run.batches)
        mask = batch["attention_mask"]
        tokens, computed = tokens + int(mask.sum()), computed + mask.numel()  # counted on the host
        if run.padding_free:
            del batch["attention_mask"]
        batch = _to_device(batch, run.device)
        sync = micro == config.grad_accum - 1 or dist.world == 1
        with _no_sync(run.forward, not sync):
            loss = run.forward(**batch).loss / config.grad_accum
            loss.backward()
        loss_sum += loss.detach()
    lr = lr_at(step, run.total, config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    # The data position of the last completed step: what a checkpoint saves (a Ctrl-C mid-step
    # resumes at this step's start).
    state.step, state.position = step + 1, run.batches.state_dict()
    counts: torch.Tensor | tuple[int, int] = (tokens, computed)
    if dist.world > 1:  # all ranks' counts: known once the all-reduce is read (`_log_pending`)
        torch.distributed.all_reduce(loss_sum)
        loss_sum /= dist.world
        counts = _to_device({"c": torch.tensor([tokens, computed])}, run.device)["c"]
        torch.distributed.all_reduce(counts)
    else:
        state.tokens += tokens
    return _StepLog(state.step, loss_sum, lr, counts, run.optimizer.last_grad_norm)


def _log_pending(run: _Run, monitor: Monitor, state: RunState) -> None:
    """Write the step waiting to be logged (its values are ready by now, or are waited for)."""
    if run.pending is None:
        return
    if run.dist.world > 1:
        state.tokens += int(run.pending.counts[0])
    run.pending.write(monitor)
    run.pending = None


def _step_seed(seed: int, step: int) -> int:
    """torch's seed for optimizer step `step`: in torch's range [0, 2**64) for any 64-bit support seed
    (the product wraps modulo 2**64; 1_000_003 is odd, so at one step distinct seeds stay distinct)."""
    return (seed * 1_000_003 + step) % 2**64


def _evaluate_and_record(run: _Run, state: RunState, monitor: Monitor) -> None:
    metrics = _evaluate(run)
    improved = monitor.log_eval(state.step, metrics)
    state.record_eval(state.step, metrics, improved, ((n, d) for n, d, *_ in run.sm.sites()))


def _evaluate_if_due(run: _Run, state: RunState, monitor: Monitor, echo) -> bool:
    """Evaluate every --eval-every steps (the last step is evaluated after the loop); True when early
    stopping ends the run here."""
    config = run.config
    if run.eval_data is None or not _due(config.eval_every, state.step) or state.step >= run.total:
        return False
    _evaluate_and_record(run, state, monitor)
    if config.early_stopping and state.stale >= config.early_stopping:
        echo(f"early stopping at step {state.step}: {config.early_stopping} evaluations without improvement")
        return True
    return False


def _due(every: int | None, step: int) -> bool:
    return every is not None and step % every == 0


def _at_boundary(run: _Run, state: RunState) -> bool:
    """Whether an evaluation or a checkpoint follows this step (they wait for the GPU anyway, and the
    log should read in order)."""
    config = run.config
    evaluating = run.eval_data is not None and _due(config.eval_every, state.step)
    return evaluating or bool(config.checkpoint_dir and _due(config.checkpoint_every, state.step))


def _checkpoint(run: _Run, state: RunState) -> None:
    if run.dist.main or run.config.fsdp:  # a sharded model's tensors are gathered by every rank
        checkpoints.save(run.config.checkpoint_dir, run.config.run_settings(), state, run.sm, run.optimizer,
                         run.base_weights)  # fmt: skip


def _train(config: TrainConfig, dist: _Dist, echo, progress: bool, on_step) -> dict:
    run = _setup(config, dist, echo)
    state = _start(run, echo)
    stopped_early = interrupted = False
    t0 = time.perf_counter()
    with Monitor(config.log_dir, run.total, rank0=dist.main, echo=echo, progress=progress,
                 resume_step=state.step if config.resume else None,
                 best=None if state.best is None else (state.best_step, state.best)) as monitor:  # fmt: skip
        if run.eval_data is not None and state.step == 0:  # what training is measured against
            state.baseline = _evaluate(run)
            monitor.log_eval(0, state.baseline, baseline=True)
        try:
            while state.step < run.total:
                logged = _step(run, state)
                _log_pending(run, monitor, state)  # the step before, done or nearly: no GPU bubble
                run.pending = logged
                if on_step is not None or _at_boundary(run, state):
                    _log_pending(run, monitor, state)
                if _evaluate_if_due(run, state, monitor, echo):
                    stopped_early = True
                    break
                if config.checkpoint_dir and _due(config.checkpoint_every, state.step):
                    _checkpoint(run, state)
                if on_step is not None:
                    on_step(state.step)
        except KeyboardInterrupt:
            interrupted = True
        _log_pending(run, monitor, state)
        if interrupted:
            if config.checkpoint_dir:
                _checkpoint(run, state)
                raise SpraError(f"interrupted after step {state.step}; checkpoint written: continue with --resume",
                                config.checkpoint_dir) from None  # fmt: skip
            raise SpraError(f"interrupted after step {state.step} (no --checkpoint-dir, nothing saved)") from None
        if run.eval_data is not None and not stopped_early and state.best_step != state.step:
            _evaluate_and_record(run, state, monitor)
        if config.checkpoint_dir:
            _checkpoint(run, state)
        elapsed = time.perf_counter() - t0

    _save_adapter(run, state)
    text, summary = monitor.summary(config.output if dist.main else None)
    summary["elapsed_s"] = elapsed
    for line in text.splitlines():
        echo(line)
    return summary


def _save_adapter(run: _Run, state: RunState) -> None:
    """The best evaluated adapter (else the last) to config.output, with what made it as provenance."""
    config, sm, data = run.config, run.sm, run.train_data
    if state.best_values is not None:
        with torch.no_grad():
            for name, delta, *_ in sm.sites():
                delta.copy_(state.best_values[name])
        sm.sync()
    values_dtype = TORCH_DTYPES[SHORT_DTYPES[config.values_dtype]]
    task = {"type": config.task}
    if data.id2label:
        task["id2label"] = {str(k): v for k, v in data.id2label.items()}
    provenance = {
        "config": config.run_settings(),
        "steps": state.step,
        "tokens": state.tokens,
        "baseline_eval": state.baseline,
        "best_eval": None if state.best is None else {"step": state.best_step, **state.best},
        "data": _data_record(data),
        "tool": "spra-tools train",
    }
    if run.eval_data is not None:
        provenance["eval_data"] = _data_record(run.eval_data)
    if run.dist.main or config.fsdp:  # a sharded model's adapter is gathered by every rank
        adapter = sm.adapter(values_dtype, provenance, task)  # its base: the checkpoint as the user named it
        if run.dist.main:
            adapter.save(config.output, config.overwrite, inputs=_inputs(config))
    if run.dist.world > 1:
        torch.distributed.barrier()


class _no_sync:
    """DDP's no_sync for all but the last micro-batch of an accumulated step; nothing otherwise."""

    def __init__(self, module, active: bool):
        self.cm = module.no_sync() if active and hasattr(module, "no_sync") else None

    def __enter__(self):
        return self.cm.__enter__() if self.cm else None

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc) if self.cm else False


@torch.no_grad()
def _evaluate(run: _Run) -> dict:
    """Token-weighted mean loss (causal-lm), or mean loss, accuracy and macro F1 (seq-cls), of the eval data."""
    config, data, model = run.config, run.eval_data, run.sm.model
    was_training = model.training
    model.eval()
    loss_sum, weight, predictions, labels = 0.0, 0, [], []
    for batch in eval_batches(data, config.batch_size, run.pad_id, config.task, run.pad_to):
        if run.padding_free:
            del batch["attention_mask"]
        batch = _to_device(batch, run.device)
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
