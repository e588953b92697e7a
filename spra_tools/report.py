"""What `spra-tools info`, `compare` and `env` report, as plain dicts (the CLI prints them as text or JSON).

They only read: an adapter's metadata and statistics, how two adapters relate, the environment.
"""

from __future__ import annotations

import os
import platform

import numpy as np
import torch

from .adapter import Adapter
from .dtypes import dtype_name
from .support import SeededSupport


def describe_adapter(adapter: Adapter, path: str | os.PathLike) -> dict:
    size = os.path.getsize(path)
    n = adapter.num_values
    model_numel = adapter.base.get("numel")
    tensors = []
    for d in adapter.deltas.values():
        v = d.values.to(torch.float32)
        support = (
            {"kind": "seeded", "seed": d.support.seed, "density": d.support.density}
            if isinstance(d.support, SeededSupport)
            else {"kind": "explicit"}
        )
        tensors.append(
            {
                "name": d.name,
                "shape": list(d.shape),
                "dtype": dtype_name(d.dtype),
                "support": support,
                "count": d.count,
                "density": d.count / d.numel if d.numel else 0.0,
                "values_dtype": dtype_name(d.values.dtype),
                "abs_mean": float(v.abs().mean()) if n and d.count else 0.0,
                "abs_max": float(v.abs().max()) if d.count else 0.0,
                "rms": float(v.square().mean().sqrt()) if d.count else 0.0,
            }
        )
    kinds = {t["support"]["kind"] for t in tensors}
    return {
        "path": os.fspath(path),
        "file_bytes": size,
        "bytes_per_value": size / n if n else None,
        "values": n,
        "tensors": len(tensors),
        "support": kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "none"),
        "density_of_targeted": n / adapter.num_adapted if adapter.num_adapted else 0.0,
        "fraction_of_model": n / model_numel if model_numel else None,
        "exact": adapter.exact,
        "base": adapter.base,
        "task": adapter.task,
        "provenance": adapter.provenance,
        "dense": {name: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for name, t in adapter.dense.items()},
        "per_tensor": tensors,
    }


def compare_adapters(a: Adapter, b: Adapter) -> dict:
    """Per tensor: support overlap, cosine of the two deltas on the overlap, and both norms."""
    tensors, overlap_total = {}, 0
    for name in sorted(set(a.deltas) | set(b.deltas)):
        da, db = a.deltas.get(name), b.deltas.get(name)
        if da is None or db is None:
            tensors[name] = {"only_in": "a" if db is None else "b"}
            continue
        ia, ib = da.support.indices(), db.support.indices()
        common, pa, pb = np.intersect1d(ia, ib, assume_unique=True, return_indices=True)
        va, vb = da.values.double()[torch.from_numpy(pa)], db.values.double()[torch.from_numpy(pb)]
        denom = float(va.norm() * vb.norm())
        tensors[name] = {
            "count_a": da.count,
            "count_b": db.count,
            "overlap": int(common.size),
            "cosine_on_overlap": float(va @ vb) / denom if denom else None,
            "norm_a": float(da.values.double().norm()),
            "norm_b": float(db.values.double().norm()),
        }
        overlap_total += int(common.size)
    shared = [t for t in tensors.values() if "overlap" in t]
    summary = {
        "tensors_in_both": len(shared),
        "only_in_one": len(tensors) - len(shared),
        "overlap": overlap_total,
        "values_a": a.num_values,
        "values_b": b.num_values,
    }
    return {"summary": summary, "tensors": tensors}


def environment() -> dict:
    from importlib.metadata import version

    from . import __version__, ops
    from .errors import SpraError

    devices = [{"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"type": "cuda", "index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)})
    backends = {}
    for d in devices:
        try:
            backends[d["type"]] = ops.backend_for(d["type"], build=False)
        except SpraError as e:
            backends[d["type"]] = f"error: {e}"
    return {
        "spra_tools": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **{pkg: version(pkg) for pkg in ("transformers", "safetensors", "huggingface_hub", "numpy", "click")},
        "devices": devices,
        "backend": {ops.BACKEND_VARIABLE: ops.backend_setting()[1], **backends},
        "extension": ops.compiled_backends(),
    }
