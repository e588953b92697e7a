"""The ops front against numpy: scatter-apply's rounding rule, gather, restore, backend selection."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from spra_tools import ops
from spra_tools.dtypes import raw_bits
from spra_tools.errors import SpraError
from spra_tools.support import ExplicitSupport, SeededSupport

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even (NaN-free inputs), written independently of torch."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = u + 0x7FFF + ((u >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def _numpy_apply(w: torch.Tensor, idx: np.ndarray, v: torch.Tensor, scale: float) -> np.ndarray:
    """The documented rule in numpy: fp32(w) + fp32(scale) * fp32(v), then cast to w's dtype; returns raw bits."""
    wf = w.float().numpy().reshape(-1).copy()
    delta = v.float().numpy()
    if scale != 1.0:
        delta = (delta * np.float32(scale)).astype(np.float32)
    summed = (wf[idx] + delta).astype(np.float32)
    if w.dtype == torch.float32:
        out = w.numpy().reshape(-1).copy()
        out[idx] = summed
        return out.view(np.uint32)
    if w.dtype == torch.float16:
        out = w.numpy().reshape(-1).copy()
        out[idx] = summed.astype(np.float16)
        return out.view(np.uint16)
    out = raw_bits(w).reshape(-1).copy()
    out[idx] = _to_bf16_bits(summed)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("values_dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,density,scale", [((64, 48), 0.1, 1.0), ((300,), 0.5, -0.37), ((3, 1), 1.0, 2.5), ((7, 5), 0.01, 1.0)]
)
def test_scatter_apply_matches_numpy(dtype, values_dtype, shape, density, scale):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, values_dtype, shape)).encode()))
    w = torch.randn(shape, generator=gen).to(dtype)
    numel = w.numel()
    support = SeededSupport(11, "t", numel, density)
    idx = ops.support_indices(support)
    v = (torch.randn(support.count, generator=gen) * 0.1).to(values_dtype)
    expected = _numpy_apply(w, idx.numpy(), v, scale)
    original = ops.gather(w, idx)
    ops.scatter_apply(w, idx, v, scale)
    assert np.array_equal(raw_bits(w).reshape(-1), expected)
    ops.restore(w, idx, original)
    assert torch.equal(ops.gather(w, idx), original)


def test_gather_is_flat_indexing():
    w = torch.randn(10, 7)
    support = ExplicitSupport(70, np.array([0, 3, 69]))
    assert torch.equal(ops.gather(w, ops.support_indices(support)), w.reshape(-1)[[0, 3, 69]])


def test_empty_support_is_a_no_op():
    w = torch.randn(4, 4)
    before = w.clone()
    idx = torch.empty(0, dtype=torch.int64)
    ops.scatter_apply(w, idx, torch.empty(0), 3.0)
    ops.restore(w, idx, torch.empty(0))
    assert torch.equal(w, before)


def test_backend_selection(monkeypatch):
    monkeypatch.setenv("SPRA_TOOLS_BACKEND", "reference")
    assert ops.backend_for("cpu") == "reference"
    monkeypatch.setenv("SPRA_TOOLS_BACKEND", "auto")
    assert ops.backend_for("cpu") in ("reference", "cpu")
    monkeypatch.setenv("SPRA_TOOLS_BACKEND", "bogus")
    with pytest.raises(SpraError, match="SPRA_TOOLS_BACKEND"):
        ops.backend_for("cpu")
    if not torch.cuda.is_available():  # whether or not the CUDA library is built
        monkeypatch.setenv("SPRA_TOOLS_BACKEND", "cuda")
        with pytest.raises(SpraError, match="SPRA_TOOLS_BACKEND=cuda is unavailable"):
            ops.backend_for("cpu")


def test_the_old_backend_variable_still_works_with_one_warning():
    """SPRA_BACKEND, the name before the SPRA_TOOLS_ prefix, is read when SPRA_TOOLS_BACKEND is unset."""
    code = "from spra_tools import ops; print(ops.backend_for('cpu'), ops.backend_for('cpu'))"
    env = {k: v for k, v in os.environ.items() if k != "SPRA_TOOLS_BACKEND"} | {"SPRA_BACKEND": "reference"}
    run = subprocess.run(
        [sys.executable, "-W", "always::DeprecationWarning", "-c", code], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["reference", "reference"]
    assert run.stderr.count("DeprecationWarning: SPRA_BACKEND is deprecated; set SPRA_TOOLS_BACKEND instead") == 1


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        ops.scatter_apply(torch.zeros(4), torch.tensor([0, 1]), torch.zeros(3))
    with pytest.raises(ValueError):
        ops.restore(torch.zeros(4), torch.tensor([0]), torch.zeros(1, dtype=torch.float16))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_reference_generation_on_cuda_matches_the_spec():
    for numel, density in [(4096 * 4096, 1e-3), (65536 * 2 + 99, 0.3), (5, 1.0)]:
        s = SeededSupport(2**63 + 1, "model.layers.0.mlp.up_proj.weight", numel, density)
        assert np.array_equal(ops.support_indices(s, "cuda").cpu().numpy(), s.indices())
