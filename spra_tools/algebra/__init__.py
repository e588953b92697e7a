"""Pure functions on adapters: diff (extract), merge, stack, reseed, compare, convert."""

from .diff import diff_checkpoints, exact_values
from .merge import merge_adapters, recipe_to_args
from .stack import compact_adapter, compare_adapters, reseed_adapter, stack_adapters

__all__ = [
    "compact_adapter",
    "compare_adapters",
    "diff_checkpoints",
    "exact_values",
    "merge_adapters",
    "recipe_to_args",
    "reseed_adapter",
    "stack_adapters",
]
