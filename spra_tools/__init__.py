"""spra-tools: SpaRTA sparse adapters — a compact file format, fast kernels and tools around them.

The public Python API (the CLI is a thin shell over it)::

    from spra_tools import Adapter, open_checkpoint, create_adapter, apply_adapter, diff_checkpoints
"""

__version__ = "0.1.0"

_LAZY = {
    "Adapter": "adapter",
    "TensorDelta": "adapter",
    "SeededSupport": "support",
    "ExplicitSupport": "support",
    "open_checkpoint": "checkpoint",
    "write_checkpoint": "checkpoint",
    "create_adapter": "surgery",
    "verify_adapter": "surgery",
    "apply_adapter": "surgery",
    "diff_checkpoints": "algebra",
    "merge_adapters": "algebra",
    "stack_adapters": "algebra",
    "SpraError": "errors",
    "SparseModel": "train",
    "SparseAdamW": "train",
    "attach": "live",
    "attached": "live",
    "swap": "live",
    "stage": "live",
    "Staged": "live",
    "load_model": "live",
    "Handle": "live",
    "MultiAdapter": "multi",
}


def __getattr__(name):
    # Lazy, so that `spra-tools --help` does not pay for importing torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'spra_tools' has no attribute {name!r}")


__all__ = [*_LAZY]
