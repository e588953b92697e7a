"""Training: the SpaRTA-trainable model wrapper and its fused optimizer (the bundled loop builds on them).

Lazy, so that importing `spra_tools.train.config` (the CLI does, for `train --help`) needs no torch.
"""

__all__ = ["SparseAdamW", "SparseModel"]


def __getattr__(name):
    if name in __all__:
        from . import sparse_model

        return getattr(sparse_model, name)
    raise AttributeError(f"module 'spra_tools.train' has no attribute {name!r}")
