"""Pure functions on adapters: diff (extract) today; merge, stack, reseed and compare build here."""

from .diff import diff_checkpoints, exact_values

__all__ = ["diff_checkpoints", "exact_values"]
