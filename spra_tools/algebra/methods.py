"""The merge methods, one declared record each, in mergekit's vocabulary (task arithmetic, TIES, DARE).

Every method is the same pipeline over the inputs' values at the union support (merge.py runs it):

1. sparsify each input: keep all (``none``), its ``int(density * count)`` largest |values|
   (``magnitude``, TIES' trim), or each value with probability density, rescaled by 1/density
   (``random``, DARE's drop);
2. weight each input by w_i;
3. optionally elect a sign per index (``consensus``, TIES: the sign of the weighted sum, 0 counting
   as positive) and keep only the inputs that agree with it;
4. sum, and optionally normalize: divide by the sum of the weights (of the agreeing inputs under a
   consensus, of all adapters otherwise).

A record declares only those choices and the weights it accepts; which parameters a method takes
(weights, density, seed) follows from them, and the CLI's choices and help are generated from here.
This module imports nothing heavy, so that `spra-tools --help` can read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import SpraError


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: how the pipeline above is configured."""

    name: str
    formula: str  # what it computes, for --help
    aliases: tuple[str, ...] = ()  # mergekit's other names for it
    sparsify: Literal["none", "magnitude", "random"] = "none"
    consensus: bool = False  # TIES sign election
    normalize: bool = False  # divide by the (agreeing) weights' sum
    weights: Literal["optional", "required", "none"] = "optional"  # "none": every input counts 1

    @property
    def parameters(self) -> tuple[str, ...]:
        """The merge parameters this method reads."""
        takes = {
            "weights": self.weights != "none",
            "density": self.sparsify != "none",
            "seed": self.sparsify == "random",
        }
        return tuple(p for p, used in takes.items() if used)

    @property
    def plain_sum(self) -> bool:
        """The values are added as they are (so disjoint exact adapters merge exactly)."""
        return self.sparsify == "none" and not self.consensus and not self.normalize

    def check_weights(self, weights, n: int) -> list[float]:
        """One finite float per adapter (all 1 when none are given and none are required)."""
        if weights is None:
            if self.weights == "required":
                raise SpraError(f"merge method {self.label} needs weights, one per adapter")
            return [1.0] * n
        if self.weights == "none":
            raise SpraError(
                f"merge method {self.name!r} takes no weights (methods that do: {methods_taking('weights')})"
            )
        if len(weights) != n:
            raise SpraError(f"got {len(weights)} weights for {n} adapters (need one per adapter)")
        out = []
        for x in weights:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise SpraError(f"merge weight {x!r} is not a finite number")
            out.append(float(x))
        if self.normalize and not self.consensus and sum(out) == 0.0:
            raise SpraError(f"merge weights sum to zero: {self.name!r} divides by their sum")
        return out

    def check_density(self, density, n: int) -> list[float]:
        """One density per adapter (all 1 when none is given)."""
        if density is None:
            return [1.0] * n
        if "density" not in self.parameters:
            raise SpraError(f"density applies only to {methods_taking('density')}, not to {self.name!r}")
        single = isinstance(density, (int, float)) and not isinstance(density, bool)
        values = [density] * n if single else density
        if not isinstance(values, (list, tuple)) or len(values) != n:
            raise SpraError(f"density must be one number or one per adapter ({n}), got {density!r}")
        from .checks import checked_density  # at call time: this module stays light to import

        return [checked_density(x) for x in values]

    @property
    def label(self) -> str:
        return f"{self.name!r}" + (f" ({', '.join(self.aliases)})" if self.aliases else "")


METHODS = (
    MergeMethod("sum", "Σ w_i v_i", aliases=("task_arithmetic",)),
    MergeMethod("mean", "Σ v_i / n (an adapter without the tensor counts as zero)", weights="none", normalize=True),
    MergeMethod("weighted", "Σ w_i v_i / Σ w_i", aliases=("linear",), weights="required", normalize=True),
    MergeMethod(
        "ties", "trim, elect signs, mean of the agreeing", sparsify="magnitude", consensus=True, normalize=True
    ),
    MergeMethod("dare_ties", "drop and rescale, elect signs, sum of the agreeing", sparsify="random", consensus=True),
    MergeMethod("dare_linear", "drop and rescale, then Σ w_i v_i", sparsify="random"),
    MergeMethod("magnitude_prune", "trim, then Σ w_i v_i", sparsify="magnitude"),
)
DEFAULT_METHOD = "sum"
_BY_NAME = {n: m for m in METHODS for n in (m.name, *m.aliases)}


def merge_method(name: str) -> MergeMethod:
    """The method called `name` (or one of its aliases); SpraError for an unknown one."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise SpraError(f"unknown merge method {name!r} (known: {', '.join(sorted(_BY_NAME))})") from None


def method_names() -> list[str]:
    """Every accepted name, each method followed by its aliases (the CLI's choices)."""
    return list(_BY_NAME)


def methods_help() -> str:
    """A table of the methods for --help: names, what they compute, the parameters they take."""
    rows = [(", ".join((m.name, *m.aliases)), m.formula, _parameters_help(m)) for m in METHODS]
    width = max(len(names) for names, _, _ in rows)
    table = "\n".join(f"  {names:<{width}}  {formula}  [{params}]" for names, formula, params in rows)
    notes = (
        "  trim: keep each adapter's int(density * count) largest |v|;\n"
        "  drop: keep each value with probability density (drawn from --seed), rescaled by 1/density."
    )
    # "\b" keeps click from re-wrapping the paragraph that follows.
    return f"\b\nMethods (mergekit's names) and the parameters they take:\n{table}\n\n\b\n{notes}"


def _parameters_help(m: MergeMethod) -> str:
    names = [f"{p} (required)" if p == "weights" and m.weights == "required" else p for p in m.parameters]
    return ", ".join(names) or "no parameters"


def methods_taking(parameter: str) -> str:
    """The methods that read `parameter` ("weights", "density", "seed"), comma-separated."""
    return ", ".join(m.name for m in METHODS if parameter in m.parameters)


__all__ = ["DEFAULT_METHOD", "METHODS", "MergeMethod", "merge_method", "method_names", "methods_help", "methods_taking"]
