"""Between a loaded transformers model's parameter names and its checkpoint's tensor names.

An adapter is keyed by checkpoint tensor names: what `create` selects, what `apply` edits, what
seeded supports are drawn under. A model that transformers loaded names the same tensors
differently, and this module undoes each difference the way transformers' own loader makes it:

* ``base_model_prefix``: a task class over a bare base (``BertForSequenceClassification`` over the
  ``encoder.layer...`` of a sentence-transformers ``BertModel``: ``bert.encoder.layer...``), or a
  bare class over a task checkpoint (``LlamaModel`` over ``model.layers...``: ``layers...``);
* the renames transformers applies on load (its conversion mapping: GPT-NeoX's ``embed_out`` is
  ``lm_head`` once loaded, Mixtral's ``block_sparse_moe`` is ``mlp``...);
* tied weights: one parameter under several names, stored once in the checkpoint.

A parameter with no checkpoint tensor (a new task head, which transformers initializes anew)
keeps its own name: an adapter stores it whole under that name and `apply` adds it. A checkpoint
tensor that transformers fuses with others on load (mixture-of-experts experts stacked into one
3-D parameter) has no one-to-one model name and is reported in `NameMap.fused`.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def _transforms(model: nn.Module) -> tuple[list, list]:
    """transformers' load-time (renamings, converters) for `model`: those its `from_pretrained` used,
    or, for a model built otherwise, those registered for its class."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming
    except ImportError:  # transformers 4 renames nothing on load but the prefix
        return [], []
    used = getattr(model, "_weight_conversions", None)
    if used is None:
        try:
            used = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
        except (AttributeError, TypeError):  # not a transformers PreTrainedModel
            used = []
    return [t for t in used if isinstance(t, WeightRenaming)], [t for t in used if isinstance(t, WeightConverter)]


def _renamed(key: str, renamings: list, converters: list) -> tuple[str, bool]:
    """`key` after transformers' renamings and at most one converter; True when a converter matched."""
    from transformers.core_model_loading import apply_converters, apply_renamings

    key = apply_renamings(key, renamings)
    key, pattern = apply_converters(key, converters)
    return key, pattern is not None


def _with_prefix(key: str, prefix: str, known: set[str]) -> str:
    """transformers' prefix rule on load: strip or add ``base_model_prefix`` when that names a key of
    the model and the key as it is does not."""
    if not prefix or key in known:
        return key
    if key.startswith(prefix + ".") and key[len(prefix) + 1 :] in known:
        return key[len(prefix) + 1 :]
    if f"{prefix}.{key}" in known:
        return f"{prefix}.{key}"
    return key


class NameMap:
    """Parameter names of `model` <-> tensor names of the checkpoint it was loaded from.

    `checkpoint_names` are the checkpoint's tensor names (or any subset to resolve, e.g. an adapter's
    keys); without them the model's own names as `save_pretrained` writes them stand in (a model not
    loaded from a checkpoint). Every name of a tied parameter maps to the one checkpoint tensor.
    """

    def __init__(self, model: nn.Module, checkpoint_names: Iterable[str] | None = None):
        self.model = model
        params = dict(model.named_parameters(remove_duplicate=False))
        # Not state_dict(): its hooks are not side-effect free (bitsandbytes 0.50 on the CPU unpacks a
        # repacked 4-bit weight's state in place, and the layer's later outputs change).
        known = set(params) | {n for n, _ in model.named_buffers(remove_duplicate=False)}
        prefix = getattr(model, "base_model_prefix", "") or ""
        renamings, converters = _transforms(model)
        if checkpoint_names is None:
            checkpoint_names = self._saved_names(model, renamings)
        first_name = {}  # id(parameter) -> its first name (named_parameters' deduplicated name)
        for name, p in params.items():
            first_name.setdefault(id(p), name)
        by_param: dict[int, str] = {}  # id(parameter) -> checkpoint name
        self.fused: dict[str, str] = {}  # checkpoint name -> the fused model parameter it loads into
        self._model_name: dict[str, str] = {}  # checkpoint name -> model parameter name
        for ckpt in checkpoint_names:
            key, fused = _renamed(ckpt, renamings, converters) if renamings or converters else (ckpt, False)
            key = _with_prefix(key, prefix, known)
            if fused:
                self.fused[ckpt] = key
                continue
            p = params.get(key)
            if p is None:
                continue
            self._model_name[ckpt] = first_name[id(p)]
            # A tied parameter stored under two names keeps the one of its deduplicated name.
            if id(p) not in by_param or key == first_name[id(p)]:
                by_param[id(p)] = ckpt
        self._checkpoint_name = {n: by_param[id(p)] for n, p in params.items() if id(p) in by_param}

    @property
    def _fused_params(self) -> set[str]:
        return set(self.fused.values())

    @staticmethod
    def _saved_names(model: nn.Module, renamings: list) -> list[str]:
        """The names `save_pretrained` would write for the model's parameters (its renames reversed)."""
        names = [n for n, _ in model.named_parameters()]
        if not renamings:
            return names
        from transformers.core_model_loading import apply_renamings

        reverse = [t.reverse_transform() for t in renamings[::-1]]
        return [apply_renamings(n, reverse) for n in names]

    def checkpoint_name(self, model_name: str) -> str:
        """The checkpoint tensor of a model parameter; a new parameter's own name."""
        return self._checkpoint_name.get(model_name, model_name)

    def model_name(self, checkpoint_name: str) -> str | None:
        """The model parameter (its deduplicated name) that a checkpoint tensor loads into, or None."""
        return self._model_name.get(checkpoint_name)

    def is_new(self, model_name: str) -> bool:
        """Whether the parameter has no checkpoint tensor (transformers initialized it anew)."""
        return model_name not in self._checkpoint_name and model_name not in self._fused_params
