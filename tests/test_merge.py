"""merge_adapters against sequential apply and against a small numpy version of mergekit's methods.

Inputs are seeded adapters of a tiny Llama (create_adapter + random values). The numpy reference
works on dense task vectors (zero outside each support), as mergekit does: trim / drop each
input, weight it, elect signs, take the (disjoint) mean or sum.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spra_tools.adapter import Adapter, TensorDelta
from spra_tools.algebra.merge import merge_adapters
from spra_tools.algebra.recipe import MergeRequest, read_recipe
from spra_tools.checkpoint import open_checkpoint
from spra_tools.dtypes import bit_view
from spra_tools.errors import SpraError
from spra_tools.format import read_container
from spra_tools.support import ExplicitSupport, SeededSupport, fnv1a64
from spra_tools.surgery import apply_adapter, create_adapter, verify_adapter
from spra_tools.testing import build_tiny_model


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def base(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    build_tiny_model("llama", root, request.param)
    return open_checkpoint(root)


def make(base, seed: int, values_seed: int, density=0.2, targets=("all-linear",), values_dtype="BF16", scale=0.05):
    adapter = create_adapter(base, density=density, seed=seed, targets=targets, values_dtype=values_dtype)
    gen = torch.Generator().manual_seed(values_seed)
    for d in adapter.deltas.values():
        d.values = (torch.randn(d.count, generator=gen) * scale).to(d.values.dtype)
    return adapter


def dense_values(adapter: Adapter, name: str, numel: int) -> np.ndarray:
    out = np.zeros(numel, dtype=np.float32)
    d = adapter.deltas[name]
    out[d.indices().numpy()] = d.values.float().numpy()
    return out


# ---------------------------------------------------------------------------------------------
# The numpy reference: mergekit's generalized task arithmetic on dense task vectors.
# ---------------------------------------------------------------------------------------------


def reference(adapters, name, method, weights=None, density=None, seed=0) -> np.ndarray:
    n = len(adapters)
    numel = next(a.deltas[name].numel for a in adapters if name in a.deltas)
    w = np.asarray(weights if weights is not None else [1.0] * n, dtype=np.float32)
    dens = [1.0] * n if density is None else [density] * n if np.isscalar(density) else list(density)
    rng = np.random.default_rng([seed, fnv1a64(name.encode())])
    tvs = np.zeros((n, numel), dtype=np.float32)
    for i, a in enumerate(adapters):
        if name not in a.deltas:
            continue
        d = a.deltas[name]
        idx, v = d.indices().numpy(), d.values.float().numpy().copy()
        if method in ("ties", "magnitude_prune"):
            k = int(dens[i] * v.size)
            order = np.argsort(-np.abs(v), kind="stable")
            v[order[k:]] = 0.0
        elif method in ("dare_ties", "dare_linear"):
            keep = rng.random(v.size) < dens[i]
            v = np.where(keep, v, np.float32(0.0))
            if dens[i] < 1.0:
                v = v / np.float32(dens[i])
        tvs[i, idx] = v
    if method == "mean":
        return np.sort(tvs, axis=0).sum(0) / np.float32(n)
    tvs = tvs * w[:, None]
    if method in ("sum", "magnitude_prune", "dare_linear"):
        return np.sort(tvs, axis=0).sum(0)
    if method == "weighted":
        return np.sort(tvs, axis=0).sum(0) / w.sum()
    sign = np.where(tvs.sum(0) >= 0, 1.0, -1.0).astype(np.float32)
    mask = np.sign(tvs) == sign
    mixed = np.where(mask, tvs, 0).sum(0)
    if method == "dare_ties":
        return mixed
    div = (w[:, None] * mask).sum(0)
    return mixed / np.where(div == 0, 1.0, div)


# (method, weights, density) — one table feeding the reference comparison.
METHOD_CASES = [
    ("sum", None, None),
    ("sum", [0.5, 2.0, -1.0], None),
    ("task_arithmetic", [1.0, 1.0, 1.0], None),
    ("mean", None, None),
    ("weighted", [0.2, 0.3, 0.5], None),
    ("linear", [1.0, 3.0, 2.0], None),
    ("ties", None, 0.5),
    ("ties", [0.7, 0.2, 1.0], 0.3),
    ("ties", [1.0, 1.0, 1.0], [0.2, 0.6, 1.0]),
    ("dare_ties", [0.5, 0.5, 0.5], 0.4),
    ("dare_linear", [1.0, 0.5, 0.25], 0.7),
    ("magnitude_prune", [1.0, 1.0, 1.0], 0.25),
]
CANON = {"task_arithmetic": "sum", "linear": "weighted"}


@pytest.mark.parametrize(
    "method,weights,density", METHOD_CASES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(METHOD_CASES)]
)
@pytest.mark.parametrize("shared", [True, False], ids=["one-seed", "three-seeds"])
def test_methods_match_numpy_reference(base, method, weights, density, shared):
    seeds = (4, 4, 4) if shared else (4, 5, 6)
    # fp32 values: the comparison is then as tight as fp32 summation order allows.
    adapters = [make(base, s, 10 + k, values_dtype="F32") for k, s in enumerate(seeds)]
    adapters[2] = make(base, seeds[2], 12, values_dtype="F32", targets=("vo",))  # fewer tensors
    merged, report = merge_adapters(adapters, method, weights, density, seed=3, base=base)
    for name, d in merged.deltas.items():
        ref = reference(adapters, name, CANON.get(method, method), weights, density, seed=3)
        got = dense_values(merged, name, d.numel)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-8, err_msg=name)
        # Values every input trims or drops leave the shared seeded support, which then becomes explicit.
        assert isinstance(d.support, SeededSupport) == (shared and report["tensors"][name]["dropped"] == 0)
    again, _ = merge_adapters(adapters, method, weights, density, seed=3, base=base)
    for name, d in merged.deltas.items():
        assert torch.equal(bit_view(d.values), bit_view(again.deltas[name].values)), "same seed, same result"
    assert merged.provenance["merge_method"] == CANON.get(method, method)


def test_dare_depends_on_seed(base):
    adapters = [make(base, 4, k) for k in range(2)]
    one, _ = merge_adapters(adapters, "dare_linear", density=0.5, seed=1, base=base)
    two, _ = merge_adapters(adapters, "dare_linear", density=0.5, seed=2, base=base)
    assert any(not torch.equal(one.deltas[n].values, two.deltas[n].values) for n in one.deltas)


def test_disjoint_sum_equals_sequential_apply(base, tmp_path):
    a = make(base, 1, 1)
    b = make(base, 2, 2)
    c = make(base, 3, 3, targets=("vo",))
    # Where supports overlap, later adapters hold zeros: the values are then disjoint.
    for name, d in b.deltas.items():
        d.values[torch.from_numpy(np.isin(d.indices().numpy(), a.deltas[name].indices().numpy()))] = 0
    for name, d in c.deltas.items():
        taken = np.union1d(a.deltas[name].indices().numpy(), b.deltas[name].indices().numpy())
        d.values[torch.from_numpy(np.isin(d.indices().numpy(), taken))] = 0
    merged, report = merge_adapters([a, b, c], base=base)
    assert report["overlap"] > 0 and report["new_supports"] > 0
    apply_adapter(base, [("m", merged)], tmp_path / "merged")
    apply_adapter(base, [("a", a), ("b", b), ("c", c)], tmp_path / "seq")
    got, want = open_checkpoint(tmp_path / "merged"), open_checkpoint(tmp_path / "seq")
    for name in base.names():
        assert torch.equal(bit_view(got.read(name)), bit_view(want.read(name))), name


def test_overlapping_sum_matches_fp32_reference(base, tmp_path):
    a, b = make(base, 1, 1), make(base, 2, 2)
    merged, report = merge_adapters([a, b], base=base)
    apply_adapter(base, [("m", merged)], tmp_path / "merged")
    out = open_checkpoint(tmp_path / "merged")
    for name, d in merged.deltas.items():
        combined = dense_values(a, name, d.numel) + dense_values(b, name, d.numel)  # fp32
        w = base.read(name).reshape(-1)
        want = (w.float() + torch.from_numpy(combined).to(d.values.dtype).float()).to(w.dtype)
        idx = d.indices()
        assert torch.equal(bit_view(out.read(name).reshape(-1)[idx]), bit_view(want[idx])), name


@settings(max_examples=15, deadline=None)
@given(order=st.permutations(range(4)))
def test_sum_is_order_independent(base_adapters, order):
    adapters, expect = base_adapters
    merged, _ = merge_adapters([adapters[i] for i in order])
    for name, d in expect.deltas.items():
        assert torch.equal(bit_view(merged.deltas[name].values), bit_view(d.values)), name


@pytest.fixture(scope="module")
def base_adapters(base):
    # One seed: identical supports, so every index sums four fp32 values (order matters without care).
    adapters = [make(base, 9, k, values_dtype="F32", scale=10.0**k) for k in range(4)]
    return adapters, merge_adapters(adapters)[0]


def test_seeded_in_seeded_out(base, tmp_path):
    adapters = [make(base, 11, k, density=0.1) for k in range(3)]
    merged, report = merge_adapters(adapters, "ties")  # density 1: nothing trimmed, the support stays
    for name, d in merged.deltas.items():
        assert d.support == adapters[0].deltas[name].support
        assert d.fingerprint == adapters[0].deltas[name].fingerprint
    assert report["new_supports"] == 0
    merged.save(tmp_path / "m.spra")
    loaded = Adapter.load(tmp_path / "m.spra")
    assert all(isinstance(d.support, SeededSupport) for d in loaded.deltas.values())


def test_values_dtype_is_the_widest(base):
    a, b = make(base, 1, 1, values_dtype="BF16"), make(base, 1, 2, values_dtype="F32")
    c = make(base, 1, 3, values_dtype="F16")
    assert all(d.values.dtype == torch.float32 for d in merge_adapters([a, b])[0].deltas.values())
    assert all(d.values.dtype == torch.bfloat16 for d in merge_adapters([a, a])[0].deltas.values())
    assert all(d.values.dtype == torch.float32 for d in merge_adapters([a, c])[0].deltas.values())


def _hand(idx, values, fp="f") -> TensorDelta:
    support = ExplicitSupport(10, np.array(idx))
    return TensorDelta("w", (2, 5), torch.float32, support, torch.tensor(values, dtype=torch.float32), {"F32": fp})


def test_report_counts_overlaps_and_sign_conflicts():
    a = _hand([0, 1, 2, 5], [1.0, -1.0, 2.0, 3.0])
    b = _hand([1, 2, 7], [1.0, 3.0, 0.0])
    c = _hand([0, 1, 2, 5, 7, 9], [0.5, 2.0, -1.0, 4.0, -2.0, 1.0])  # contains the others
    adapters = [Adapter({"w": t}, base={"name": "x", "numel": 10}) for t in (a, b, c)]
    merged, report = merge_adapters(adapters)
    entry = report["tensors"]["w"]
    # Overlaps at 0 (a,c), 1 (a,b,c), 2 (a,b,c), 5 (a,c), 7 (b,c); conflicts at 1 and 2 (a zero has no sign).
    assert (entry["overlap"], entry["sign_conflicts"]) == (5, 2)
    assert (report["overlap"], report["sign_conflicts"], report["values"]) == (5, 2, 6)
    assert entry["norms"] == pytest.approx([np.sqrt(15.0), np.sqrt(10.0), np.sqrt(26.25)])
    out = np.array([1.5, 2.0, 4.0, 7.0, -2.0, 1.0], dtype=np.float32)
    assert merged.deltas["w"].values.numpy().tolist() == out.tolist()
    assert entry["out_norm"] == pytest.approx(float(np.linalg.norm(out)))
    assert merged.deltas["w"].support is c.support and merged.deltas["w"].fingerprint == {"F32": "f"}
    lone = Adapter({"v": _hand([3], [1.0])}, base={"name": "x", "numel": 10})
    _, report = merge_adapters([adapters[0], lone])
    assert report["tensors"]["v"]["norms"] == [None, 1.0]


# (what, build inputs, kwargs, message fragment) — refusals.
def _other_base(base):
    a, b = make(base, 1, 1), make(base, 2, 2)
    b.base = {**b.base, "numel": b.base["numel"] + 1}
    return [a, b]


def _shape(base):
    a, b = make(base, 1, 1), make(base, 1, 2)
    name = next(iter(b.deltas))
    d = b.deltas[name]
    b.deltas[name] = TensorDelta(name, (d.numel,), d.dtype, d.support, d.values, d.fingerprint)
    return [a, b]


def _fingerprint(base):
    a, b = make(base, 1, 1), make(base, 1, 2)
    next(iter(b.deltas.values())).fingerprint = {k: "0" * 16 for k in a.deltas[next(iter(a.deltas))].fingerprint}
    return [a, b]


REFUSALS = [
    ("different base sizes", _other_base, {}, "different bases"),
    ("shape mismatch", _shape, {}, "shape"),
    ("same support, other base values", _fingerprint, {}, "fingerprint"),
    ("weighted without weights", lambda b: [make(b, 1, 1)] * 2, {"method": "weighted"}, "needs weights"),
    ("weights count", lambda b: [make(b, 1, 1)] * 2, {"weights": [1.0]}, "2 adapters"),
    ("zero weight sum", lambda b: [make(b, 1, 1)] * 2, {"method": "linear", "weights": [1, -1]}, "sum to zero"),
    ("density zero", lambda b: [make(b, 1, 1)] * 2, {"method": "ties", "density": 0.0}, "(0, 1]"),
    ("density above one", lambda b: [make(b, 1, 1)] * 2, {"method": "dare_ties", "density": 1.5}, "(0, 1]"),
    ("density for sum", lambda b: [make(b, 1, 1)] * 2, {"density": 0.5}, "applies only"),
    ("trimming without base", lambda b: [make(b, 1, 1)] * 2, {"method": "ties", "density": 0.5}, "add --base BASE"),
    ("unknown method", lambda b: [make(b, 1, 1)] * 2, {"method": "slerp"}, "unknown merge method"),
    ("new support without base", lambda b: [make(b, 1, 1), make(b, 2, 2)], {}, "--base"),
    ("nothing", lambda b: [], {}, "nothing to merge"),
]


@pytest.mark.parametrize("what,inputs,kwargs,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals(base, what, inputs, kwargs, message):
    with pytest.raises(SpraError, match=message.replace("(", r"\(").replace("]", r"\]")):
        merge_adapters(inputs(base), **kwargs)


def test_base_is_verified_when_given(base, tmp_path):
    a, b = make(base, 1, 1), make(base, 2, 2)
    next(iter(b.deltas.values())).fingerprint = {"BF16": "0" * 16, "F32": "0" * 16}
    with pytest.raises(SpraError, match="fingerprint"):
        merge_adapters([a, b], base=base, names=["a.spra", "b.spra"])


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------


def test_read_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "merge_method: ties\nbase_model: meta-llama/Llama-3.1-8B\nparameters:\n  density: 0.5\n"
        "models:\n  - model: a.spra\n    parameters: {weight: 0.7}\n"
        "  - model: /abs/b.spra\n    parameters: {weight: 0.3, density: 0.2}\ndtype: bfloat16\n"
    )
    request = read_recipe(tmp_path / "r.yaml")
    assert request == MergeRequest(
        paths=(str(tmp_path / "a.spra"), "/abs/b.spra"),
        method="ties",
        weights=(0.7, 0.3),
        density=(0.5, 0.2),
        seed=0,
        base="meta-llama/Llama-3.1-8B",
    )
    (tmp_path / "s.yaml").write_text("merge_method: task_arithmetic\nmodels: [a.spra, b.spra]\nseed: 5\n")
    request = read_recipe(tmp_path / "s.yaml")
    assert (request.method, request.weights, request.density, request.seed) == ("sum", None, None, 5)


BAD_RECIPES = [
    ("not: [valid", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("models: [a.spra]\n", "merge_method"),
    ("merge_method: slerp\nmodels: [a.spra]\n", "unknown merge method"),
    ("merge_method: ties\nmodels: []\n", "non-empty list"),
    ("merge_method: ties\nmodels: [{parameters: {weight: 1}}]\n", "needs a 'model'"),
    ("merge_method: ties\nmodels: [{model: a, parameters: {lambda: 1}}]\n", "unsupported parameters"),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: [1, 0.5]}}]\n", "per-layer"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}, b]\n", "not for models"),
    ("merge_method: ties\nslices: []\nmodels: [a]\n", "unsupported keys"),
]


@pytest.mark.parametrize("text,message", BAD_RECIPES, ids=[m for _, m in BAD_RECIPES])
def test_bad_recipes(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(SpraError, match=message):
        read_recipe(tmp_path / "bad.yaml")


def test_a_new_support_without_base_is_refused_before_any_merging(base, monkeypatch):
    import spra_tools.algebra.merge as merge_module

    a, b = make(base, 1, 1), make(base, 1, 2)
    last = list(b.deltas)[-1]
    b.deltas[last] = make(base, 2, 3).deltas[last]  # only the last tensor's union support is new
    combined = []
    monkeypatch.setattr(merge_module, "_combine", lambda *args: combined.append(args))
    with pytest.raises(SpraError, match=f"tensor '{last}' has different supports .* add --base BASE"):
        merge_adapters([a, b])
    assert combined == [], "values were merged before the refusal"


def _kept_union(adapters, name, method, density, seed=0) -> np.ndarray:
    """The indices some input keeps after its trim (largest |v|) or DARE drop: numpy, by hand."""
    rng = np.random.default_rng([seed, fnv1a64(name.encode())])
    kept = []
    for a in adapters:
        d = a.deltas[name]
        idx, v = d.indices().numpy(), d.values.float().numpy()
        if method in ("ties", "magnitude_prune"):
            keep = np.argsort(-np.abs(v), kind="stable")[: int(density * v.size)]
        else:
            keep = np.flatnonzero(rng.random(v.size) < density)
        kept.append(idx[keep])
    return np.unique(np.concatenate(kept))


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_ties", "dare_linear"])
@pytest.mark.parametrize("seeds", [(4, 4), (4, 5)], ids=["one-seed", "two-seeds"])
def test_trimmed_values_leave_the_support(base, tmp_path, method, seeds):
    adapters = [make(base, s, 20 + k) for k, s in enumerate(seeds)]
    full, _ = merge_adapters(adapters, method, base=base)  # density 1: the union support
    merged, report = merge_adapters(adapters, method, density=0.3, seed=7, base=base)
    dropped = 0
    for name, d in merged.deltas.items():
        kept = _kept_union(adapters, name, method, 0.3, seed=7)
        assert np.array_equal(d.indices().numpy(), kept), name
        ref = reference(adapters, name, method, density=0.3, seed=7)
        np.testing.assert_allclose(dense_values(merged, name, d.numel), ref.astype(np.float32), rtol=1e-2, atol=1e-4)
        dropped += full.deltas[name].count - d.count
    assert report["dropped"] == dropped > 0 and report["values"] == merged.num_values
    assert verify_adapter(base, merged) == []  # the smaller supports are fingerprinted on the base
    merged.save(tmp_path / "trimmed.spra")
    full.save(tmp_path / "full.spra")
    data_bytes = {
        k: (c := read_container(tmp_path / f"{k}.spra")).file_size - 8 - c.header_size for k in ("trimmed", "full")
    }
    assert data_bytes["trimmed"] < 0.8 * data_bytes["full"]  # values and supports, not the document


def test_recorded_base_names_are_descriptive(tiny_llama):
    """One base spelled two ways (a Hub id and its local copy, a symlinked path): the same seed's
    fingerprints agree, so the merge goes ahead; the names do not decide."""
    base = open_checkpoint(tiny_llama)
    a, b = make(base, 1, 1), make(base, 1, 2)
    b.base = {**b.base, "name": "/some/other/spelling/of/the/base"}
    merged, _ = merge_adapters([a, b])
    assert merged.num_values == a.num_values


def test_the_merged_adapter_records_the_base_size_any_parent_knew(tiny_llama):
    """A trained adapter of an older version recorded no size; merged first, its gap is not inherited."""
    base = open_checkpoint(tiny_llama)
    a, b = make(base, 1, 1), make(base, 1, 2)
    a.base = {"name": a.base["name"]}
    merged, _ = merge_adapters([a, b])
    assert merged.base["numel"] == base.numel == b.base["numel"]
