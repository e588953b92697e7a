"""Training: the SpaRTA-trainable model wrapper and its fused optimizer (the bundled loop builds on them)."""

from .sparse_model import SparseAdamW, SparseModel

__all__ = ["SparseAdamW", "SparseModel"]
