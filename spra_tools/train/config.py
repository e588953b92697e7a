"""TrainConfig: every setting of a `spra-tools train` run, and the learning-rate schedule it implies.

A run is fully described by one frozen `TrainConfig`, built by `TrainConfig.resolve` from an optional
YAML file (keys are field names, or the CLI spelling with dashes) with the flags the user gave on
top. Field names match the CLI flags (`grad_accum` is `--grad-accum`; `base` is the BASE argument),
so every validation error names the flag to fix; each field declares its help text, and the CLI's
options are generated from the fields. The config is saved with checkpoints and adapters
(`to_dict`), which is why it carries a version.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Literal

from ..errors import SpraError
from ..format import SHORT_DTYPES
from ..fsutil import read_yaml
from ..support import check_seed
from ..targets import PRESETS

VERSION = 1
# Settings that may differ between a run and its resumption (they change nothing it computes).
_RESUMABLE = ("output", "resume", "log_dir", "checkpoint_dir", "checkpoint_every", "overwrite", "fsdp")


Task = Literal["causal-lm", "seq-cls"]
TASKS: tuple[str, ...] = typing.get_args(Task)
Quantize = Literal["nf4", "fp4", "int8"]  # bitsandbytes settings of each: quantized.BNB_SETTINGS
ValuesDtype = Literal[tuple(SHORT_DTYPES)]  # what every command's --values-dtype offers
DEFAULT_EPOCHS = 1.0  # when neither --steps nor --epochs is given


def _setting(default=MISSING, help: str | None = None, **cli):
    """A field (required when it has no default) with its help text and how the CLI spells it
    (`short`, `metavar`, `argument`): the options of `spra-tools train` are generated from these, so
    each default and help text exists once."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one fine-tuning run; each field's help is the text of its `spra-tools train` flag."""

    base: str = _setting(help="Hub id or local checkpoint of the model to adapt.", argument=True)
    data: str = _setting(
        help="Training data: .jsonl / .json / .csv / .parquet, or a `datasets` directory.", metavar="PATH"
    )
    output: str = _setting(help="The .spra adapter to write.", short="-o", metavar="FILE")
    task: Task = _setting("causal-lm", "Causal-LM fine-tuning, or sequence classification (a new head).")
    density: float = _setting(0.01, "Fraction of each targeted tensor that trains, in (0, 1].")
    seed: int = _setting(0, "Picks the support (with --density) and seeds data order and head init.")
    targets: tuple[str, ...] = _setting(
        ("all-linear",), f"Preset ({', '.join(PRESETS)}) or regex over tensor names; repeatable.",
        metavar="PRESET|REGEX",
    )  # fmt: skip
    exclude: tuple[str, ...] = _setting((), "Regex of tensors not to adapt; repeatable.", metavar="REGEX")
    steps: int | None = _setting(None, "Optimizer steps (or --epochs, not both).")
    epochs: float | None = _setting(
        None, f"Passes over the data, fractions allowed ({DEFAULT_EPOCHS:g} when --steps is not given)."
    )
    # Sparse deltas train well at larger rates than full fine-tuning.
    lr: float = _setting(2e-4, "Peak learning rate.")
    batch_size: int = _setting(8, "Examples per micro-batch and process.")
    grad_accum: int = _setting(1, "Micro-batches per optimizer step.")
    max_length: int = _setting(512, "Tokens per example (or packed sequence); longer ones are cut.")
    packing: bool = _setting(False, "Concatenate causal-LM examples into full --max-length sequences.")
    # Padding is compute spent on nothing: with lengths grouped a batch pads a few percent, not ~30 %.
    group_by_length: bool = _setting(
        True, "Batch examples of similar length together (shuffled groups of 64 batches) to pad less; on by default."
    )
    warmup: float = _setting(0.0, "Warm-up: a fraction of the steps (< 1) or a whole number of steps.")
    schedule: Literal["cosine", "linear", "constant"] = _setting("cosine", "Learning-rate decay after warm-up.")
    weight_decay: float = _setting(0.0, "AdamW decoupled decay; it pulls the deltas (not the base) towards 0.")
    max_grad_norm: float | None = _setting(1.0, "Clip the global gradient norm; 0 turns clipping off.")
    betas: tuple[float, float] = _setting((0.9, 0.999), "AdamW's moment decay rates.", metavar="B1 B2")
    eps: float = _setting(1e-8, "AdamW's epsilon.")
    eval_data: str | None = _setting(None, "Held-out data, same format.", metavar="PATH")
    eval_every: int | None = _setting(None, "Steps between evaluations (default: once, at the end).")
    early_stopping: int | None = _setting(
        None, "Stop after PATIENCE evaluations without improvement; keep the best.", metavar="PATIENCE"
    )
    checkpoint_dir: str | None = _setting(None, "Where checkpoints go (for --resume).", metavar="DIR")
    checkpoint_every: int | None = _setting(None, "Steps between checkpoints (default: at the end).")
    resume: bool = _setting(False, "Continue from the checkpoint in --checkpoint-dir, bit-exactly.")
    device: Literal["auto", "cpu", "cuda"] = _setting("auto", "Where to train (auto: CUDA when visible).")
    dtype: Literal["bf16", "fp32"] = _setting("bf16", "Of the frozen base weights and activations.")
    quantize: Quantize | None = _setting(
        None, "Load the base quantized (bitsandbytes 4-bit NF4 / FP4, or int8) and train the deltas beside it; "
        "the adapter applies to the full-precision base as usual.",
    )  # fmt: skip
    gradient_checkpointing: bool = _setting(False, "Recompute activations in backward (less memory).")
    # How the run is spread, not what it computes: resumable either way (`_RESUMABLE`).
    fsdp: bool = _setting(
        False,
        "Shard the base over the torchrun processes with FSDP2 (bases larger than one GPU); "
        "without it each process holds the whole base (DDP).",
    )
    log_dir: str | None = _setting(None, "metrics.jsonl, TensorBoard events and curves.png go here.", metavar="DIR")
    values_dtype: ValuesDtype = _setting("bf16", "Of the delta values stored in the adapter.")
    overwrite: bool = _setting(False, "Replace OUTPUT if it exists.")
    version: int = VERSION

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), _HINTS[f.name]))
        if self.version != VERSION:
            raise SpraError(f"train config version {self.version} is not supported (this spra-tools reads {VERSION})")
        if self.steps is None and self.epochs is None:
            object.__setattr__(self, "epochs", DEFAULT_EPOCHS)
        checks = [
            (0.0 < self.density <= 1.0, "--density must be in (0, 1]"),
            (self.steps is None or self.epochs is None, "give --steps or --epochs, not both"),
            (self.steps is None or self.steps >= 1, "--steps must be >= 1"),
            (self.epochs is None or self.epochs > 0, "--epochs must be > 0"),
            (self.lr > 0, "--lr must be > 0"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"),
            (self.max_length >= 2, "--max-length must be >= 2"),  # one token leaves nothing to predict
            (not self.packing or self.task == "causal-lm", "--packing only applies to --task causal-lm"),
            (
                self.warmup >= 0 and (self.warmup < 1 or self.warmup.is_integer()),
                "--warmup must be a fraction in [0, 1) or a whole number of steps",
            ),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.max_grad_norm is None or self.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0: no clipping)"),
            (all(0 <= b < 1 for b in self.betas), "--betas must both be in [0, 1)"),
            (self.eps > 0, "--eps must be > 0"),
            (self.eval_every is None or self.eval_every >= 1, "--eval-every must be >= 1"),
            (self.eval_every is None or self.eval_data is not None, "--eval-every needs --eval-data"),
            (self.early_stopping is None or self.early_stopping >= 1, "--early-stopping must be >= 1"),
            (self.early_stopping is None or self.eval_data is not None, "--early-stopping needs --eval-data"),
            (self.early_stopping is None or self.eval_every is not None, "--early-stopping needs --eval-every"),
            (self.checkpoint_every is None or self.checkpoint_every >= 1, "--checkpoint-every must be >= 1"),
            (
                self.checkpoint_every is None or self.checkpoint_dir is not None,
                "--checkpoint-every needs --checkpoint-dir",
            ),
            (not self.resume or self.checkpoint_dir is not None, "--resume needs --checkpoint-dir"),
            # FSDP2 shards the weights it all-gathers; a quantized layer keeps packed bytes it cannot shard.
            (not (self.fsdp and self.quantize), "--fsdp and --quantize cannot be combined"),
        ]
        for ok, message in checks:
            if not ok:
                raise SpraError(message)
        try:
            check_seed(self.seed)  # the supports' seed: 64 bits, unsigned
        except ValueError as e:
            raise SpraError(f"--{e}") from None
        for target in self.targets:
            if target not in PRESETS:
                _check_regex("--targets", target, f" is neither a preset ({', '.join(PRESETS)}) nor a valid regex")
        for pattern in self.exclude:
            _check_regex("--exclude", pattern, " is not a valid regex")

    def to_dict(self) -> dict:
        """A JSON-able dict (tuples become lists) that `from_dict` turns back into an equal config."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def run_settings(self) -> dict:
        """`to_dict` less where outputs go and how the run is resumed: the settings that decide what
        it computes, which a checkpoint must match and an adapter records."""
        return {k: v for k, v in self.to_dict().items() if k not in _RESUMABLE}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The inverse of `to_dict`; unknown or missing keys raise SpraError naming them."""
        unknown = sorted(map(str, set(d) - _NAMES))
        if unknown:
            raise SpraError(f"unknown train settings: {', '.join(unknown)}")
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise SpraError(f"missing required train settings: {', '.join(missing)}")
        return cls(**d)

    @classmethod
    def resolve(cls, config_file: str | None, overrides: dict) -> TrainConfig:
        """The config from a YAML file (or none) with `overrides` (the CLI flags) on top.

        An override of None, or an empty tuple (what an absent `multiple=True` click option gives),
        means "not given" and keeps the file's value. Giving one of --steps / --epochs drops the
        other from the file, so the flag wins instead of clashing. Paths are kept as written (relative
        to the working directory), as on the command line: `base` may be a Hub id, not a path.
        """
        settings = _load_yaml(config_file) if config_file is not None else {}
        given = _canonical({k: v for k, v in overrides.items() if v is not None and v != ()}, "overrides", None)
        for a, b in (("steps", "epochs"), ("epochs", "steps")):
            if a in given and b not in given:
                settings.pop(b, None)
        settings.update(given)
        return cls.from_dict(settings)

    def warmup_steps(self, total_steps: int) -> int:
        """Warm-up length in optimizer steps: ceil(fraction x total), or the count, never above total."""
        w = math.ceil(self.warmup * total_steps) if self.warmup < 1 else int(self.warmup)
        return min(w, total_steps)

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run: --steps, or ceil(epochs x micro-batches per epoch / grad_accum)."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * batches_per_epoch / self.grad_accum))


def schedule_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """The multiplier of `config.lr` at optimizer step `step` (0 is the first step) of `total_steps`.

    Warm-up: step s < W uses (s + 1) / W, a linear ramp from 0 that reaches the peak at step W - 1
    without spending a step at lr 0. Then with p = (s - W) / (total_steps - W), the progress from
    step W (the peak) to step total_steps (one past the last, where the rate would reach 0):
    cosine 0.5 (1 + cos(pi p)), linear 1 - p, constant 1. Every step trains at a rate > 0.
    This matches torch.optim.lr_scheduler.LambdaLR, whose lambda(s) is the rate of step s.
    """
    if total_steps < 1 or step < 0:
        raise ValueError(f"need 0 <= step and total_steps >= 1, got step={step}, total_steps={total_steps}")
    warm = config.warmup_steps(total_steps)
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "linear":
        return 1.0 - progress
    return 1.0


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): config.lr x schedule_factor."""
    return config.lr * schedule_factor(step, total_steps, config)


def _flag(name: str) -> str:
    return "BASE" if name == "base" else "--" + name.replace("_", "-")


def _coerce(name: str, value, hint):
    """`value` as the field's type (a list becomes a tuple, an int a float), or a SpraError naming the flag."""
    flag = _flag(name)
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in args:
            raise SpraError(f"{flag} must be one of {', '.join(args)} (got {value!r})")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise SpraError(f"{flag} must be true or false (got {value!r})")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpraError(f"{flag} must be a whole number (got {value!r})")
        return value
    if hint is float:
        return _number(flag, value)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise SpraError(f"{flag} must be a non-empty string (got {value!r})")
        return value
    if origin is tuple and args[-1] is Ellipsis:  # tuple[str, ...]; a lone string is a one-item list
        items = (value,) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
            raise SpraError(f"{flag} must be a list of non-empty strings (got {value!r})")
        if name == "targets" and not items:
            raise SpraError(f"{flag} must name at least one preset or regex")
        return tuple(items)
    if origin is tuple:  # tuple[float, float]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise SpraError(f"{flag} must be {len(args)} numbers (got {value!r})")
        return tuple(_number(flag, v) for v in value)
    raise TypeError(f"no coercion for {name}: {hint}")


def _number(flag: str, value) -> float:
    # YAML 1.1 reads `1e-4` (no dot) as a string, so numeric strings are accepted.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SpraError(f"{flag} must be a number (got {value!r})")
    try:
        x = float(value)
    except ValueError:
        raise SpraError(f"{flag} must be a number (got {value!r})") from None
    if not math.isfinite(x):
        raise SpraError(f"{flag} must be finite (got {value!r})")
    return x


def _check_regex(flag: str, pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise SpraError(f"{flag} {pattern!r}{what}: {e}") from None


def _canonical(d: dict, what: str, where: str | None) -> dict:
    """Keys as field names (`grad-accum` -> `grad_accum`); unknown keys raise SpraError naming them."""
    out = {}
    unknown = []
    for key, value in d.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name not in _NAMES:
            unknown.append(str(key))
        elif name in out:
            raise SpraError(f"setting {name} given twice in {what}", where)
        out[name] = value
    if unknown:
        raise SpraError(f"unknown train settings in {what}: {', '.join(sorted(unknown))}", where)
    return out


def _load_yaml(path: str) -> dict:
    doc = read_yaml(path, "the config")
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise SpraError("config must be a mapping of setting: value", path)
    return _canonical(doc, "the config", path)


_HINTS = typing.get_type_hints(TrainConfig)
_NAMES = frozenset(_HINTS)
_REQUIRED = tuple(f.name for f in fields(TrainConfig) if f.default is MISSING)
