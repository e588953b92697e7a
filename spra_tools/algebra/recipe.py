"""What to merge and how: a `MergeRequest`, read from a mergekit-style YAML recipe and/or given as flags.

A recipe uses mergekit's vocabulary::

    merge_method: ties                  # or an alias: task_arithmetic, linear
    base_model: ./Llama-3.2-1B          # optional; becomes the request's base
    parameters: {density: 0.5}          # defaults for every model
    models:
      - model: math.spra                # paths relative to the recipe's folder
        parameters: {weight: 0.7}
      - code.spra
    seed: 0                             # DARE's draws

Keys mergekit uses for model files (dtype, tokenizer_source, ...) are accepted and ignored;
per-layer parameter lists and slices are refused.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..errors import SpraError
from .methods import DEFAULT_METHOD, merge_method

_RECIPE_KEYS = {"merge_method", "models", "parameters", "base_model", "seed"}
_IGNORED_KEYS = {"dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "name"}
_PARAMS = ("weight", "density")


@dataclass(frozen=True)
class MergeRequest:
    """The inputs of one merge: adapter paths, the method (canonical name) and its parameters, the base.

    `weights`: one per adapter or None; `density`: one float, one per adapter, or None (the
    method's default); `base`: a checkpoint path or Hub id, or None.
    """

    paths: tuple[str, ...] = ()
    method: str = DEFAULT_METHOD
    weights: tuple[float, ...] | None = None
    density: float | tuple[float, ...] | None = None
    seed: int = 0
    base: str | None = None

    def with_flags(self, paths=(), method=None, weights=None, density=None, seed=None, base=None) -> MergeRequest:
        """This request with the command line on top: every flag given (not None) replaces the
        recipe's value, and adapters given as arguments replace the recipe's models."""
        given = {"method": method, "weights": weights, "density": density, "seed": seed, "base": base}
        changes = {k: v for k, v in given.items() if v is not None}
        if "method" in changes:
            changes["method"] = merge_method(changes["method"]).name
        for key in ("weights", "density"):
            if isinstance(changes.get(key), list):
                changes[key] = tuple(changes[key])
        if paths:
            changes["paths"] = tuple(os.fspath(p) for p in paths)
        return dataclasses.replace(self, **changes)


def read_recipe(path: str | os.PathLike) -> MergeRequest:
    """The request a mergekit-style YAML recipe describes (module docstring); one SpraError line
    naming the recipe for anything it cannot use."""
    from ..fsutil import read_yaml

    where = os.fspath(path)
    doc = read_yaml(where, "recipe")

    def bad(msg):
        return SpraError(f"bad merge recipe: {msg}", where)

    if not isinstance(doc, dict):
        raise bad("expected a mapping with merge_method and models")
    unknown = set(doc) - _RECIPE_KEYS - _IGNORED_KEYS
    if unknown:
        raise bad(f"unsupported keys {sorted(unknown)} (known: {sorted(_RECIPE_KEYS)})")
    method = doc.get("merge_method")
    if not isinstance(method, str):
        raise bad("merge_method is missing or not a string")
    try:
        method = merge_method(method).name
    except SpraError as e:
        raise bad(e.message) from None
    models = doc.get("models")
    if not isinstance(models, list) or not models:
        raise bad("models must be a non-empty list of {model: path, parameters: {...}}")
    defaults = _recipe_params(doc.get("parameters"), "top-level parameters", bad)
    root = os.path.dirname(os.path.abspath(where))

    def resolve(p):
        return p if os.path.isabs(p) else os.path.join(root, p)

    paths, per_model = [], []
    for k, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) or not entry["model"]:
            raise bad(f"models[{k}] needs a 'model' path")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise bad(f"models[{k}] has unsupported keys {sorted(extra)}")
        paths.append(resolve(entry["model"]))
        per_model.append({**defaults, **_recipe_params(entry.get("parameters"), f"models[{k}].parameters", bad)})

    weights = [p.get("weight") for p in per_model]
    if all(x is None for x in weights):
        weights = None
    elif any(x is None for x in weights):
        missing = [k for k, x in enumerate(weights) if x is None]
        raise bad(f"weight given for some models but not for models{missing}")
    densities = [p.get("density") for p in per_model]
    if all(x is None for x in densities):
        density = None
    elif len(set(densities)) == 1:
        density = densities[0]
    else:
        density = tuple(1.0 if x is None else x for x in densities)
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise bad(f"seed must be a non-negative integer, got {seed!r}")
    base = doc.get("base_model")
    if base is not None and not isinstance(base, str):
        raise bad("base_model must be a path or Hub id")
    if base is not None and os.path.exists(resolve(base)):
        base = resolve(base)
    return MergeRequest(tuple(paths), method, None if weights is None else tuple(weights), density, seed, base)


def _recipe_params(params, where: str, bad) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise bad(f"{where} must be a mapping")
    unknown = set(params) - set(_PARAMS)
    if unknown:
        raise bad(f"{where}: unsupported parameters {sorted(unknown)} (supported: weight, density)")
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"{where}.{key} must be a number (per-layer lists and filters are not supported)")
    return {k: float(v) for k, v in params.items()}


__all__ = ["MergeRequest", "read_recipe"]
