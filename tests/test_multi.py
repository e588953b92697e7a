"""MultiAdapter: mixed-adapter batches on tiny transformers models against the same model with each
row's adapter attached in place (the reference), and base rows against the plain model, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import spra_tools
from spra_tools.adapter import Adapter, TensorDelta
from spra_tools.checkpoint import open_checkpoint
from spra_tools.demo import build_tiny_model
from spra_tools.errors import MismatchError, SpraError
from spra_tools.multi import BASE, MultiAdapter
from spra_tools.support import ExplicitSupport
from spra_tools.surgery import create_adapter

ARCHS = ["llama", "qwen2", "gpt2"]  # gpt2: Conv1D layers, weight [in, out]


def _adapter(base_dir, seed, density=0.05, targets=("all-linear",)) -> Adapter:
    a = create_adapter(open_checkpoint(base_dir), density, seed, list(targets))
    gen = torch.Generator().manual_seed(seed)
    for d in a.deltas.values():
        d.values = (torch.randn(d.count, generator=gen) * 0.05).to(torch.bfloat16)
    return a


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Per architecture: a bf16 checkpoint directory and three adapters of it (all linear layers)."""
    root = tmp_path_factory.mktemp("multi")
    out = {}
    for arch in ARCHS:
        build_tiny_model(arch, root / arch, torch.bfloat16, seed=3)
        out[arch] = (root / arch, [_adapter(root / arch, s, 0.02 * s) for s in (1, 2, 3)])
    return out


def _model(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _batch(rows=4, length=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 250, (rows, length), generator=gen)}


def _attached_logits(model, adapter, batch):
    with torch.no_grad(), spra_tools.attached(model, adapter):
        return model(**batch).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_match_their_adapter_attached_in_place_and_base_rows_are_the_plain_model(tiny, arch):
    path, adapters = tiny[arch]
    model = _model(path)
    ma = MultiAdapter(model)
    for i, a in enumerate(adapters):
        ma.load(f"a{i}", a)
    names = ["a1", BASE, "a0", "a2", "a0"]
    batch = _batch(len(names))
    got = ma(**batch, adapter_names=names).logits
    with torch.no_grad():
        plain = model(**batch).logits
    for row, name in enumerate(names):
        if name == BASE:
            assert torch.equal(got[row], plain[row])
        else:
            want = _attached_logits(model, adapters[int(name[1])], batch)[row]
            torch.testing.assert_close(got[row], want, rtol=1e-4, atol=1e-5)
            assert not torch.allclose(got[row], plain[row], atol=1e-3)  # the adapter did something
    with torch.no_grad():  # the model itself is untouched, and calls outside `ma` are plain
        assert torch.equal(model(**batch).logits, plain)


def test_bf16_rows_are_within_bf16_error_of_the_fp32_truth(tiny):
    path, adapters = tiny["llama"]
    model, truth_model = _model(path, torch.bfloat16), _model(path)
    ma = MultiAdapter(model)
    ma.load("a", adapters[0])
    ma.load("b", adapters[1])
    names = ["a", "b", BASE, "a"]
    batch = _batch(len(names), seed=1)
    got = ma(**batch, adapter_names=names).logits.float()
    for row, name in enumerate(names):
        if name == BASE:
            continue
        adapter = adapters[0 if name == "a" else 1]
        truth = _attached_logits(truth_model, adapter, batch)[row]
        in_place = _attached_logits(model, adapter, batch)[row].float()
        assert (got[row] - truth).abs().max() <= 2 * (in_place - truth).abs().max()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_greedy_with_kv_cache_and_beams(tiny, arch):
    path, adapters = tiny[arch]
    model = _model(path)
    ma = MultiAdapter(model)
    ma.load("a", adapters[0])
    ma.load("b", adapters[2])
    names = ["b", BASE, "a"]
    batch = _batch(len(names), length=6, seed=2)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    for extra in ({}, {"num_beams": 2}):
        got = ma.generate(**batch, adapter_names=names, **settings, **extra)
        with torch.no_grad():
            plain = model.generate(**batch, **settings, **extra)
        for row, name in enumerate(names):
            if name == BASE:
                assert torch.equal(got[row], plain[row])
                continue
            with torch.no_grad(), spra_tools.attached(model, adapters[0 if name == "a" else 2]):
                want = model.generate(**batch, **settings, **extra)
            assert torch.equal(got[row], want[row]), (extra, row)


def test_generate_sampling_with_one_adapter_for_all_rows(tiny):
    path, adapters = tiny["llama"]
    model = _model(path)
    ma = MultiAdapter(model)
    ma.load("a", adapters[1])
    batch = _batch(3, length=5, seed=3)
    settings = dict(max_new_tokens=10, do_sample=True, top_k=50, pad_token_id=0, num_return_sequences=2)
    torch.manual_seed(7)
    got = ma.generate(**batch, adapter_names="a", **settings)
    with torch.no_grad(), spra_tools.attached(model, adapters[1]):
        torch.manual_seed(7)
        want = model.generate(**batch, **settings)
    assert got.shape == (6, 15) and torch.equal(got, want)


def test_unload_keeps_the_others_exact_and_frees_the_memory(tiny):
    path, adapters = tiny["llama"]
    model = _model(path)
    ma = MultiAdapter(model)
    for i, a in enumerate(adapters):
        ma.load(f"a{i}", a)
    total = ma.resident_bytes()
    batch = _batch(3, seed=4)
    before = ma(**batch, adapter_names=["a0", "a1", "a2"]).logits
    ma.unload("a1")  # the middle one: a2's values move down in the pool
    assert ma.names == ["a0", "a2"] and ma.resident_bytes() < total
    after = ma(**batch, adapter_names=["a0", BASE, "a2"]).logits
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    ma.load("again", adapters[1])  # takes the free slot
    again = ma(**batch, adapter_names=["a0", "again", "a2"]).logits
    assert torch.equal(again, before)


def test_regenerated_supports_and_explicit_supports_give_the_same_rows(tiny):
    path, adapters = tiny["llama"]
    model = _model(path)
    stored, regenerated = MultiAdapter(model), MultiAdapter(_model(path), regenerate_supports=True)
    explicit = Adapter(
        {
            n: TensorDelta(n, d.shape, d.dtype, ExplicitSupport(d.numel, d.support.indices()), d.values, d.fingerprint)
            for n, d in adapters[0].deltas.items()
        }
    )
    stored.load("seeded", adapters[0])
    stored.load("explicit", explicit)
    regenerated.load("seeded", adapters[0])
    batch = {"input_ids": _batch(1, seed=5)["input_ids"].repeat(2, 1)}  # two identical rows
    a = stored(**batch, adapter_names=["seeded", "explicit"]).logits
    b = regenerated(**batch, adapter_names="seeded").logits
    assert torch.equal(a[0], a[1]) and torch.equal(a[0], b[0])  # the same sums in the same order
    with pytest.raises(SpraError, match="cannot be regenerated"):
        regenerated.load("explicit", explicit)


def test_a_wrong_base_is_refused_with_nothing_loaded(tiny, tmp_path):
    path, adapters = tiny["llama"]
    build_tiny_model("llama", tmp_path / "other", torch.bfloat16, seed=9)
    foreign = _adapter(tmp_path / "other", 1)
    model = _model(path)
    ma = MultiAdapter(model)
    ma.load("a", adapters[0])
    footprint = ma.resident_bytes()
    batch = _batch(2, seed=6)
    before = ma(**batch, adapter_names=["a", BASE]).logits
    with pytest.raises(MismatchError, match="fingerprint"):
        ma.load("foreign", foreign)
    assert ma.names == ["a"] and ma.resident_bytes() == footprint
    assert torch.equal(ma(**batch, adapter_names=["a", BASE]).logits, before)


def test_bad_requests_are_one_clear_error(tiny):
    path, adapters = tiny["llama"]
    model = _model(path)
    ma = MultiAdapter(model)
    ma.load("a", adapters[0])
    batch = _batch(2)
    with pytest.raises(SpraError, match="no adapter named 'nope'"):
        ma(**batch, adapter_names=["a", "nope"])
    with pytest.raises(SpraError, match="a batch of 2 rows for 3 adapter_names"):
        ma(**batch, adapter_names=["a", "a", "a"])
    with pytest.raises(SpraError, match="already loaded"):
        ma.load("a", adapters[1])
    with pytest.raises(SpraError, match="non-empty string"):
        ma.load(BASE, adapters[1])
    embedding = _adapter(path, 4, targets=["embed_tokens"])
    with pytest.raises(SpraError, match="not the weight of one nn.Linear"):
        ma.load("emb", embedding)
    dense = _adapter(path, 5)
    dense.dense = {"lm_head.weight": model.lm_head.weight.detach().clone()}
    with pytest.raises(SpraError, match="replaces whole tensors"):
        ma.load("dense", dense)
    assert ma.names == ["a"]


def test_close_gives_the_layers_their_forward_back(tiny):
    path, adapters = tiny["gpt2"]
    model = _model(path)
    batch = _batch(2)
    with torch.no_grad():
        plain = model(**batch).logits
    ma = MultiAdapter(model)
    ma.load("a", adapters[0])
    ma.close()
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("regenerate", [False, True])
def test_on_cuda_rows_match_attach_in_place(tiny, arch, regenerate):
    path, adapters = tiny[arch]
    model = _model(path).cuda()
    ma = MultiAdapter(model, regenerate_supports=regenerate)
    for i, a in enumerate(adapters):
        ma.load(f"a{i}", a)
    names = ["a2", "a0", BASE, "a1", "a2"]
    batch = {k: v.cuda() for k, v in _batch(len(names), seed=8).items()}
    got = ma(**batch, adapter_names=names).logits
    with torch.no_grad():
        plain = model(**batch).logits
    for row, name in enumerate(names):
        if name == BASE:
            assert torch.equal(got[row], plain[row])
        else:
            want = _attached_logits(model, adapters[int(name[1])], batch)[row]
            torch.testing.assert_close(got[row], want, rtol=1e-4, atol=1e-4)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = ma.generate(**batch, adapter_names=names, **settings)
    with torch.no_grad(), spra_tools.attached(model, adapters[1]):
        want = model.generate(**batch, **settings)
    assert torch.equal(out[3], want[3])
    assert np.isfinite(ma.resident_bytes())
