"""The unmerged sparse product (ops.sparse_addmm) on every backend against a float64 numpy oracle.

The oracle builds each slot's dense matrix from the numpy spec of its support (support.py), so the
block layout, the in-kernel regeneration and the segment handling are all checked independently.
Tolerances: fp32 within the rounding bound of a sequential fp32 sum; bf16/fp16 at most twice the
error torch's own matmul (in that dtype) makes against the same float64 truth.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from spra_tools import ops
from spra_tools.ops import extension
from spra_tools.support import SeededSupport

CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
BACKENDS = ["reference", "cpu", pytest.param("cuda", marks=CUDA)]
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture
def backend(request, monkeypatch):
    name = request.param
    if name != "reference":
        status = extension.load(name)
        if status != "ok":
            pytest.skip(f"{name} extension unavailable: {status}")
    monkeypatch.setenv("SPRA_TOOLS_BACKEND", name)
    return name


def _device(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


class Case:
    """Slots of one [rows, cols] shape (densities; 0 = a slot with an empty support), their pooled
    operands on `device`, and the float64 dense matrices of the oracle."""

    def __init__(self, rows, cols, densities, values_dtype, regenerate, device, seed=0):
        gen = _gen(rows, cols, densities, seed)
        self.rows, self.cols = rows, cols
        ptrs, offsets, keys, values, self.dense = [], [], [], [], []
        position = 0
        for slot, density in enumerate(densities):
            dense = np.zeros(rows * cols)
            if density == 0:  # an adapter that leaves this matrix alone
                blocks = -(-rows * cols // 65536)
                ptrs.append(torch.full((blocks + 1,), position, dtype=torch.int64))
                keys.append(torch.zeros(1, dtype=torch.int64))
                self.dense.append(dense.reshape(rows, cols))
                continue
            s = SeededSupport(seed * 100 + slot, f"w{slot}", rows * cols, density)
            if regenerate:
                layout = ops.SparseLayout.seeded(s, rows, cols, "cpu")
            else:
                layout = ops.SparseLayout.from_indices(torch.from_numpy(s.indices()), rows, cols)
            v = (torch.randn(s.count, generator=gen) * 0.5).to(values_dtype)
            ptrs.append(layout.block_ptrs[0] + position)
            offsets.append(layout.offsets)
            keys.append(layout.keys)
            values.append(v)
            position += s.count
            dense[s.indices()] = v.double().numpy()
            self.dense.append(dense.reshape(rows, cols))
        self.values = torch.cat(values).to(device)
        self.block_ptrs = torch.stack(ptrs).to(device)
        self.offsets = None if regenerate else torch.cat(offsets).to(device)
        self.keys = torch.cat(keys).to(device) if regenerate else None

    def run(self, out, x, segments, transposed):
        table = ops.segment_table(segments, out.device)
        ops.sparse_addmm(out, x, self.values, self.block_ptrs, table, self.offsets, self.keys, transposed)

    def truth(self, out, x, segments, transposed) -> np.ndarray:
        y = out.double().cpu().numpy().copy()
        xs = x.double().cpu().numpy()
        for first, end, slot in segments:
            if slot >= 0:
                m = self.dense[slot]
                y[first:end] += xs[first:end] @ (m if transposed else m.T)
        return y

    def torch_error(self, out, x, segments, transposed, truth) -> np.ndarray:
        """What torch's own matmul makes at out's dtype: (x @ M) rounded, added to out, rounded."""
        y = out.clone().cpu()
        for first, end, slot in segments:
            if slot >= 0:
                m = torch.from_numpy(self.dense[slot]).to(out.dtype)
                y[first:end] = y[first:end] + x[first:end].cpu() @ (m if transposed else m.t())
        return np.abs(y.double().numpy() - truth)

    def sum_bound(self, out, x, segments, transposed) -> np.ndarray:
        """Rounding bound of a sequential fp32 sum of |out| + Σ|x·m| over at most n terms."""
        y = np.abs(out.double().cpu().numpy())
        xs = np.abs(x.double().cpu().numpy())
        n = max(int((m != 0).sum(0 if transposed else 1).max()) for m in self.dense) + 2
        for first, end, slot in segments:
            if slot >= 0:
                m = np.abs(self.dense[slot])
                y[first:end] += xs[first:end] @ (m if transposed else m.T)
        return 2 * n * 2.0**-24 * y


def _check(case, out, x, segments, transposed, before):
    truth = case.truth(before, x, segments, transposed)
    got = out.double().cpu().numpy()
    covered = np.zeros(out.shape[0], dtype=bool)
    for first, end, slot in segments:
        covered[first:end] = slot >= 0
    base_rows = ~covered
    assert torch.equal(out.cpu()[torch.from_numpy(base_rows)], before.cpu()[torch.from_numpy(base_rows)])
    err = np.abs(got - truth)[covered]
    if out.dtype == torch.float32:
        bound = case.sum_bound(before, x, segments, transposed)[covered]
        assert (err <= bound).all(), f"max error {err.max():.3g}, bound there {bound[err.argmax()]:.3g}"
    else:
        own = case.torch_error(before, x, segments, transposed, truth)[covered].max()
        floor = EPS[out.dtype] * np.abs(truth[covered]).max()  # one rounding of the largest result
        assert err.max() <= max(2 * own, floor), f"max error {err.max():.3g}, torch's own {own:.3g}"


SEGMENTS = [(0, 3, 1), (3, 4, -1), (4, 5, 0), (6, 7, 2), (7, 11, 3), (11, 12, 1)]  # ragged, 1-row, base, gap


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("regenerate", [False, True])
@pytest.mark.parametrize(
    "rows,cols,densities",
    [
        ((48, 300, (0.3, 0.05, 0.0, 1.0))),  # many rows per block; an empty slot; a full support
        ((2, 70_000, (0.01, 0.05, 0.2, 0.001))),  # rows longer than a block
        ((64, 2_000, (0.05, 0.02, 0.001, 0.3))),  # blocks denser than the ranked path (> 1024 per block)
        ((1_000, 3, (0.5, 0.1, 1.0, 0.01))),  # many short rows
    ],
)
def test_matches_the_oracle(backend, rows, cols, densities, regenerate, transposed):
    device = _device(backend)
    case = Case(rows, cols, densities, torch.bfloat16, regenerate, device)
    feat_in, feat_out = (rows, cols) if transposed else (cols, rows)
    gen = _gen(rows, cols, transposed)
    x = torch.randn(12, feat_in, generator=gen).to(device)
    out = torch.randn(12, feat_out, generator=gen).to(device)
    before = out.clone()
    case.run(out, x, SEGMENTS, transposed)
    _check(case, out, x, SEGMENTS, transposed, before)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("values_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("transposed", [False, True])
def test_activation_and_value_dtypes(backend, dtype, values_dtype, transposed):
    device = _device(backend)
    rows, cols = 256, 384
    case = Case(rows, cols, (0.02, 0.1, 0.05, 0.01), values_dtype, False, device, seed=1)
    feat_in, feat_out = (rows, cols) if transposed else (cols, rows)
    gen = _gen(dtype, values_dtype)
    x = torch.randn(12, feat_in, generator=gen).to(dtype).to(device)
    out = torch.randn(12, feat_out, generator=gen).to(dtype).to(device)
    before = out.clone()
    case.run(out, x, SEGMENTS, transposed)
    _check(case, out, x, SEGMENTS, transposed, before)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("regenerate", [False, True])
def test_long_segments_and_feature_major_inputs(backend, regenerate):
    # Segments longer than a launch's token tile, and x given feature-major (a transposed view).
    device = _device(backend)
    case = Case(96, 160, (0.05, 0.2), torch.bfloat16, regenerate, device, seed=2)
    gen = _gen("long", regenerate)
    x = torch.randn(160, 300, generator=gen).t().to(device)  # [300, 160], strides (1, 300)
    out = torch.randn(300, 96, generator=gen).to(device)
    before = out.clone()
    segments = [(0, 1, 0), (1, 200, 1), (200, 201, -1), (201, 300, 0)]
    case.run(out, x, segments, False)
    _check(case, out, x, segments, False, before)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_base_rows_and_empty_tables_are_untouched_bit_for_bit(backend):
    device = _device(backend)
    case = Case(64, 64, (0.1, 0.0), torch.bfloat16, False, device)
    x = torch.randn(6, 64).to(device)
    out = torch.randn(6, 64).to(device)
    out[0, 0] = -0.0  # a negative zero must not become +0 on a row that only "adds" zeros
    before = out.clone()
    for segments in ([], [(0, 6, -1)], [(0, 6, 1)]):  # nothing; all base; an adapter empty here
        case.run(out, x, segments, False)
        assert torch.equal(out.view(torch.int32), before.view(torch.int32))


@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=CUDA)], indirect=True)
@pytest.mark.parametrize("regenerate", [False, True])
def test_cuda_and_cpu_kernels_agree_bit_for_bit(backend, regenerate, monkeypatch):
    case = Case(300, 700, (0.02, 0.3), torch.bfloat16, regenerate, "cuda", seed=3)
    gen = _gen("agree", regenerate)
    x = torch.randn(9, 700, generator=gen).to(torch.bfloat16)
    out = torch.randn(9, 300, generator=gen).to(torch.bfloat16)
    segments = [(0, 4, 0), (4, 5, 1), (5, 9, 0)]
    on_gpu = out.cuda()
    case.run(on_gpu, x.cuda(), segments, False)
    monkeypatch.setenv("SPRA_TOOLS_BACKEND", "cpu")
    cpu = Case(300, 700, (0.02, 0.3), torch.bfloat16, regenerate, "cpu", seed=3)
    cpu.run(out, x, segments, False)
    assert torch.equal(on_gpu.cpu().view(torch.int16), out.view(torch.int16))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_linear_forward_and_input_gradient_of_one_delta(backend):
    """The training pieces: y = x Wᵀ + x Δᵀ and g · Δ, with the layout as given and built transposed."""
    device = _device(backend)
    out_f, in_f = 80, 120
    s = SeededSupport(5, "w", out_f * in_f, 0.05)
    idx = torch.from_numpy(s.indices()).to(device)
    values = torch.randn(s.count, generator=_gen("grad"), dtype=torch.float32).to(device)
    delta = torch.zeros(out_f * in_f, dtype=torch.float64, device=device)
    delta[idx] = values.double()
    delta = delta.view(out_f, in_f)
    x = torch.randn(7, in_f, dtype=torch.float64, device=device)
    g = torch.randn(7, out_f, dtype=torch.float64, device=device)
    layouts = {
        "stored": ops.SparseLayout.from_indices(idx, out_f, in_f),
        "seeded": ops.SparseLayout.seeded(s, out_f, in_f, device),
    }
    transposed = ops.SparseLayout.from_indices(idx, out_f, in_f, transpose=True)  # the layout of Δᵀ
    for name, layout in layouts.items():
        y = torch.zeros(7, out_f, device=device)
        ops.sparse_linear_add(y, x.float(), layout, values)
        torch.testing.assert_close(y.double(), x @ delta.t(), rtol=1e-5, atol=1e-5, msg=name)
        gx = torch.zeros(7, in_f, device=device)
        ops.sparse_linear_add(gx, g.float(), layout, values, transposed=True)  # scattered (atomics on CUDA)
        torch.testing.assert_close(gx.double(), g @ delta, rtol=1e-5, atol=1e-5, msg=name)
    gx = torch.zeros(7, in_f, device=device)
    ops.sparse_linear_add(gx, g.float(), transposed, values)  # owner-computes: deterministic everywhere
    torch.testing.assert_close(gx.double(), g @ delta, rtol=1e-5, atol=1e-5)


def _op_args(device, regenerate):
    case = Case(64, 200, (0.1, 0.3), torch.bfloat16, regenerate, device, seed=4)
    x = torch.randn(5, 200, device=device, dtype=torch.bfloat16)
    out = torch.randn(5, 64, device=device, dtype=torch.bfloat16)
    table = ops.segment_table([(0, 2, 1), (2, 3, -1), (3, 5, 0)], device)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    offsets = case.offsets if case.offsets is not None else empty.short()
    keys = case.keys if case.keys is not None else empty
    return (out, x, case.values, case.block_ptrs, offsets, keys, table.tensor, table.max_rows, False)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=CUDA)], indirect=True)
@pytest.mark.parametrize("regenerate", [False, True])
def test_opcheck(backend, regenerate):
    torch.library.opcheck(torch.ops.spra_tools.sparse_addmm.default, _op_args(_device(backend), regenerate))


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=CUDA)], indirect=True)
def test_torch_compile_fullgraph(backend):
    device = _device(backend)
    case = Case(64, 200, (0.1, 0.3), torch.bfloat16, False, device, seed=6)
    table = ops.segment_table([(0, 3, 1), (3, 4, -1), (4, 6, 0)], device)
    weight = torch.randn(64, 200, device=device, dtype=torch.bfloat16)

    def forward(x):
        y = torch.nn.functional.linear(x, weight)
        ops.sparse_addmm(y, x, case.values, case.block_ptrs, table, offsets=case.offsets)
        return y * 2

    x = torch.randn(6, 200, device=device, dtype=torch.bfloat16)
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    assert torch.equal(compiled(x), forward(x))


def test_bad_operands_are_refused():
    with pytest.raises(ValueError, match="sorted, disjoint"):
        ops.segment_table([(0, 3, 0), (2, 4, 1)], "cpu")
    case = Case(16, 16, (0.5,), torch.float32, False, "cpu")
    with pytest.raises(ValueError, match="row-major out"):
        case.run(torch.zeros(3, 16).t(), torch.zeros(16, 3), [(0, 1, 0)], False)
    with pytest.raises((ValueError, RuntimeError), match="block_ptrs"):
        ops.sparse_addmm(torch.zeros(2, 16), torch.zeros(2, 70_000), case.values, case.block_ptrs,
                         ops.segment_table([(0, 2, 0)], "cpu"), offsets=case.offsets)  # fmt: skip
