"""Pure functions on adapters: diff (extract), merge, stack, reseed, compact, convert.

The names below load with their module on first use, so that the CLI can read the merge-method
registry (methods.py) without importing torch.
"""

import importlib

_MODULES = {
    "diff": ("diff_checkpoints", "exact_values"),
    "merge": ("merge_adapters", "merge_files"),
    "recipe": ("MergeRequest", "read_recipe"),
    "reseed": ("compact_adapter", "reseed_adapter"),
    "stack": ("stack_adapters",),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)


__all__ = sorted(_HOME)
