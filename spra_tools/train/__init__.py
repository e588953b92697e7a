"""Training: the SpaRTA-trainable model wrapper (the bundled loop builds on it)."""

from .sparse_model import SparseModel

__all__ = ["SparseModel"]
