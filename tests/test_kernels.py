"""Compiled kernels (CPU here, CUDA where a GPU exists) against the reference backend and the spec.

Every comparison is bit for bit: the ops' results are defined exactly (docs/FORMAT.md §7).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from spra_tools import ops
from spra_tools.dtypes import bit_view
from spra_tools.ops import extension
from spra_tools.ops.library import DEFAULTS
from spra_tools.support import SeededSupport, as_int64, tensor_key

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
    ),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VECTORS = json.loads((Path(__file__).parent / "vectors" / "seeded_v1.json").read_text())


@pytest.fixture(autouse=True)
def compiled(request, monkeypatch):
    if not hasattr(request.node, "callspec"):
        return
    device = request.node.callspec.params.get("device", "cpu")
    status = extension.load(device)
    if status != "ok":
        pytest.skip(f"{device} extension unavailable: {status}")
    monkeypatch.setenv("SPRA_TOOLS_BACKEND", device)


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _vector_cases():
    cases = VECTORS["cases"] if isinstance(VECTORS, dict) else VECTORS
    return [c for c in cases if int(c["numel"]) <= 1 << 26]


@pytest.mark.parametrize("device", DEVICES)
def test_generation_matches_the_committed_vectors(device):
    for c in _vector_cases():
        s = SeededSupport(int(c["seed"]), c["name"], int(c["numel"]), float(c["density"]))
        got = ops.support_indices(s, device).cpu().numpy()
        assert np.array_equal(got, s.indices()), c["name"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "numel,density",
    [(1, 1.0), (5, 0.2), (65536, 0.01), (65536 * 3 + 17, 0.3), (200_001, 1.0), (300_000, 0.07), (4096 * 4096, 1e-3)],
)
def test_generation_matches_the_spec_on_both_paths(device, numel, density):
    # Densities above 4096 / 65536 per block take the membership path, below it the sorting path.
    s = SeededSupport(2**64 - 1, "model.layers.3.mlp.up_proj.weight", numel, density)
    assert np.array_equal(ops.support_indices(s, device).cpu().numpy(), s.indices())


@pytest.mark.parametrize("device", DEVICES)
def test_generation_beyond_2_31_elements(device):
    numel = 2**33 + 123  # shape only: no weight exists
    s = SeededSupport(7, "huge", numel, 1e-7)
    got = ops.support_indices(s, device).cpu().numpy()
    assert got.size == s.count and got[-1] > 2**32
    assert np.array_equal(got, s.indices())


@pytest.mark.parametrize("device", DEVICES)
def test_multi_tensor_generation_is_the_concatenation(device):
    sups = [
        SeededSupport(1, f"t{i}", n, d)
        for i, (n, d) in enumerate([(70_000, 0.01), (5, 0.1), (1000, 0.5), (65536, 1.0)])
    ]
    got = torch.ops.spra_tools.seeded_indices(
        torch.empty(0, device=device),
        [as_int64(tensor_key(s.seed, s.name)) for s in sups],
        [s.numel for s in sups],
        [s.density for s in sups],
    )
    assert np.array_equal(got.cpu().numpy(), np.concatenate([s.indices() for s in sups]))


def _model(device, dtype, key):
    gen = _gen(key)
    shapes = [(64, 48), (300,), (3, 1), (7, 5), (70_000,), (1000, 70)]
    densities = [0.1, 0.5, 1.0, 0.01, 0.02, 0.08]  # 0.08: the membership path on full blocks
    weights = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]
    sups = [SeededSupport(9, f"w{i}", w.numel(), d) for i, (w, d) in enumerate(zip(weights, densities))]
    return weights, sups, gen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("values_dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, -0.37])
def test_seeded_apply_gather_restore_match_the_reference(device, dtype, values_dtype, scale):
    weights, sups, gen = _model(device, dtype, (str(dtype), str(values_dtype), scale))
    values = (torch.randn(sum(s.count for s in sups), generator=gen) * 0.1).to(values_dtype).to(device)
    expected = [w.clone() for w in weights]
    keys, densities = [as_int64(tensor_key(s.seed, s.name)) for s in sups], [s.density for s in sups]

    original = ops.apply_seeded(weights, sups, values, scale)
    expected_original = DEFAULTS["seeded_apply"](expected, keys, densities, values, scale, True)
    assert torch.equal(bit_view(original), bit_view(expected_original))
    for w, e in zip(weights, expected):
        assert torch.equal(bit_view(w), bit_view(e))
    assert torch.equal(
        bit_view(ops.gather_seeded(weights, sups)), bit_view(DEFAULTS["seeded_gather"](expected, keys, densities))
    )

    before = [w.clone() for w in weights]
    ops.restore_seeded(weights, sups, original)
    assert not all(torch.equal(bit_view(w), bit_view(b)) for w, b in zip(weights, before))
    assert torch.equal(bit_view(ops.gather_seeded(weights, sups)), bit_view(original))


# Shapes whose sizes are no multiple of 2**16 (a short last block), and one of exactly two blocks.
_SHAPES = [(3, 70_001), (131_077,), (1000, 65), (7,), (2, 65536)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,values_dtype,scale",
    [
        (torch.bfloat16, torch.bfloat16, 1.0),
        (torch.float16, torch.float32, -0.37),
        (torch.float32, torch.bfloat16, 2.5),
    ],
)
# 1e-4 .. 1e-3: the direct permutation; 3e-3 and 1 %: its tabled round function; 5 %: dense blocks.
@pytest.mark.parametrize("density", [1e-4, 1e-3, 3e-3, 0.01, 0.05])
def test_seeded_ops_across_densities_and_ragged_shapes(device, dtype, values_dtype, scale, density):
    gen = _gen("ragged", str(dtype), density)
    weights = [torch.randn(s, generator=gen).to(dtype).to(device) for s in _SHAPES]
    sups = [SeededSupport(3, f"r{i}", w.numel(), density) for i, w in enumerate(weights)]
    keys, densities = [as_int64(tensor_key(s.seed, s.name)) for s in sups], [s.density for s in sups]
    values = torch.randn(sum(s.count for s in sups), generator=gen).to(values_dtype).to(device)
    expected = [w.clone() for w in weights]
    original = ops.apply_seeded(weights, sups, values, scale)
    expected_original = DEFAULTS["seeded_apply"](expected, keys, densities, values, scale, True)
    assert torch.equal(bit_view(original), bit_view(expected_original))
    assert all(torch.equal(bit_view(w), bit_view(e)) for w, e in zip(weights, expected))
    assert torch.equal(
        bit_view(ops.gather_seeded(weights, sups)), bit_view(DEFAULTS["seeded_gather"](expected, keys, densities))
    )
    assert np.array_equal(ops.indices_many(sups, device).cpu().numpy(), np.concatenate([s.indices() for s in sups]))
    ops.restore_seeded(weights, sups, original)
    assert torch.equal(bit_view(ops.gather_seeded(weights, sups)), bit_view(original))


def _many_case(device, dtype, key):
    """Weights (one with an empty support) and sorted random flat indices for each."""
    gen = _gen("many", key)
    shapes = [(257, 33), (5,), (70_001,), (40, 40)]
    weights = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]
    counts = [2000, 0, 3000, 1600]  # the last: every element of its tensor
    indices = torch.cat([torch.randperm(w.numel(), generator=gen)[:c].sort().values for w, c in zip(weights, counts)])
    return weights, indices.to(device), counts, gen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("values_dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_many_ops_match_the_reference(device, dtype, values_dtype, index_dtype):
    weights, indices, counts, gen = _many_case(device, dtype, (str(dtype), str(values_dtype), str(index_dtype)))
    indices = indices.to(index_dtype)
    values = torch.randn(indices.numel(), generator=gen).to(values_dtype).to(device)
    expected = [w.clone() for w in weights]
    before = [w.clone() for w in weights]
    assert torch.equal(
        bit_view(ops.gather_many(weights, indices, counts)),
        bit_view(DEFAULTS["gather_many"](expected, indices, counts)),
    )
    for scale in (1.0, -0.37):
        original = ops.scatter_apply_many(weights, indices, counts, values, scale)
        expected_original = DEFAULTS["scatter_apply_many"](expected, indices, counts, values, scale, True)
        assert torch.equal(bit_view(original), bit_view(expected_original))
        assert all(torch.equal(bit_view(w), bit_view(e)) for w, e in zip(weights, expected))
        ops.restore_many(weights, indices, counts, original)
        DEFAULTS["restore_many"](expected, indices, counts, expected_original)
        assert all(torch.equal(bit_view(w), bit_view(b)) for w, b in zip(weights, before))
    assert ops.scatter_apply_many(weights, indices, counts, values, save_originals=False).numel() == 0
    DEFAULTS["scatter_apply_many"](expected, indices, counts, values, 1.0, False)
    assert all(torch.equal(bit_view(w), bit_view(e)) for w, e in zip(weights, expected))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("values_dtype", DTYPES)
def test_explicit_ops_match_the_reference(device, dtype, values_dtype):
    gen = _gen("explicit", str(dtype), str(values_dtype))
    w = torch.randn(257, 33, generator=gen).to(dtype).to(device)
    idx = torch.randperm(w.numel(), generator=gen)[:2000].sort().values.to(device)
    v = torch.randn(idx.numel(), generator=gen).to(values_dtype).to(device)
    expected = w.clone()
    DEFAULTS["scatter_apply"](expected, idx, v, 2.5)
    original = ops.gather(w, idx)
    assert torch.equal(bit_view(original), bit_view(DEFAULTS["gather"](w, idx)))
    ops.scatter_apply(w, idx, v, 2.5)
    assert torch.equal(bit_view(w), bit_view(expected))
    ops.restore(w, idx, original)
    assert torch.equal(bit_view(ops.gather(w, idx)), bit_view(original))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_supports_and_empty_index_lists(device):
    w = torch.randn(5, device=device)
    s = SeededSupport(0, "tiny", 5, 0.1)  # floor(0.5) == 0 elements
    before = w.clone()
    original = ops.apply_seeded([w], [s], torch.empty(0, device=device), 3.0)
    assert original.numel() == 0 and torch.equal(w, before)
    ops.scatter_apply(w, torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, device=device))
    assert torch.equal(w, before)
    none = torch.empty(0, dtype=torch.int32, device=device)
    assert ops.scatter_apply_many([w, w[:2]], none, [0, 0], torch.empty(0, device=device)).numel() == 0
    assert ops.gather_many([w], none, [0]).numel() == 0
    ops.restore_many([w], none, [0], torch.empty(0, device=device))
    assert torch.equal(w, before)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    from torch.library import opcheck

    gen = _gen("opcheck")
    w = torch.randn(40, 40, generator=gen).to(torch.bfloat16).to(device)
    s = SeededSupport(2, "w", w.numel(), 0.1)
    key = [as_int64(tensor_key(s.seed, s.name))]
    idx = ops.support_indices(s, device)
    v = torch.randn(s.count, generator=gen).to(device)
    tests = ("test_schema", "test_faketensor")
    opcheck(
        torch.ops.spra_tools.seeded_indices, (torch.empty(0, device=device), key, [w.numel()], [0.1]), test_utils=tests
    )
    opcheck(torch.ops.spra_tools.seeded_gather, ([w], key, [0.1]), test_utils=tests)
    opcheck(torch.ops.spra_tools.seeded_apply, ([w], key, [0.1], v, 0.5, True), test_utils=tests)
    opcheck(torch.ops.spra_tools.seeded_restore, ([w], key, [0.1], w.reshape(-1)[: s.count].clone()), test_utils=tests)
    opcheck(torch.ops.spra_tools.gather, (w, idx), test_utils=tests)
    opcheck(torch.ops.spra_tools.scatter_apply, (w, idx, v, 1.0), test_utils=tests)
    opcheck(torch.ops.spra_tools.restore, (w, idx, w.reshape(-1)[idx].clone()), test_utils=tests)
    many = ([w, w.clone()], torch.cat([idx, idx[:-1]]).to(torch.int32), [idx.numel(), idx.numel() - 1])
    opcheck(torch.ops.spra_tools.gather_many, many, test_utils=tests)
    both = torch.cat([v, v[:-1]])
    opcheck(torch.ops.spra_tools.scatter_apply_many, (*many, both, 0.5, True), test_utils=tests)
    opcheck(torch.ops.spra_tools.restore_many, (*many, both.to(w.dtype)), test_utils=tests)


@pytest.mark.parametrize("device", DEVICES)
def test_cli_output_is_the_same_on_every_backend(device, tmp_path, monkeypatch):
    """SPRA_TOOLS_BACKEND=reference, cpu and cuda: the same files and the same printed supports (the
    CLI works on CPU tensors; a CUDA backend runs its kernels on copies)."""
    from click.testing import CliRunner

    from spra_tools.adapter import Adapter
    from spra_tools.cli import cli
    from spra_tools.testing import build_tiny_model

    build_tiny_model("llama", tmp_path / "base", shard_size="100KB")
    runner = CliRunner()
    outputs = {}
    for backend in ("reference", device):
        monkeypatch.setenv("SPRA_TOOLS_BACKEND", backend)
        spra = tmp_path / f"{backend}.spra"
        assert (
            runner.invoke(
                cli,
                [
                    "create",
                    str(tmp_path / "base"),
                    "-o",
                    str(spra),
                    "--density",
                    "0.3",
                    "--seed",
                    "5",
                    "--targets",
                    "all-linear",
                ],
            ).exit_code
            == 0
        )
        adapter = Adapter.load(spra)
        for d in adapter.deltas.values():  # non-zero values, the same for both backends
            d.values = torch.randn(d.count, generator=_gen(d.name)).to(torch.bfloat16)
        adapter.save(spra, overwrite=True)
        name = next(iter(adapter.deltas))
        indices = runner.invoke(cli, ["info", str(spra), "--indices", name])
        assert indices.exit_code == 0
        assert (
            runner.invoke(cli, ["apply", str(tmp_path / "base"), str(spra), "-o", str(tmp_path / backend)]).exit_code
            == 0
        )
        files = sorted((tmp_path / backend).iterdir())
        outputs[backend] = (spra.read_bytes(), indices.output, [(f.name, f.read_bytes()) for f in files])
    assert outputs["reference"] == outputs[device]


@pytest.mark.skipif(
    os.environ.get("SPRA_TOOLS_BUILD_EXT") != "1", reason="SPRA_TOOLS_BUILD_EXT=1 makes the build required"
)
def test_required_extensions_build():
    """CI sets SPRA_TOOLS_BUILD_EXT=1: the CPU library must build, and the CUDA one compile and link
    wherever torch is a CUDA build and a toolkit is present (a GPU is not needed)."""
    assert extension.load("cpu") == "ok"
    if extension.unavailable("cuda") is None:
        assert extension.load("cuda") == "ok"
