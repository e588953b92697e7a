"""Live adapters on transformers models: attach equals the file apply, detach is the base bit for bit.

The reference for "attached" is the checkpoint `apply` writes, loaded by transformers.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import spra_tools
from spra_tools.adapter import Adapter
from spra_tools.algebra import diff_checkpoints
from spra_tools.checkpoint import open_checkpoint
from spra_tools.dtypes import bit_view
from spra_tools.errors import MismatchError, SpraError
from spra_tools.surgery import apply_adapter, create_adapter
from spra_tools.testing import build_tiny_model


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, snapshot) -> bool:
    return all(torch.equal(bit_view(p), bit_view(snapshot[n])) for n, p in model.named_parameters())


def _adapter(base_dir, seed, density=0.05, targets=("all-linear",), values_seed=0) -> Adapter:
    a = create_adapter(open_checkpoint(base_dir), density, seed, targets)
    gen = torch.Generator().manual_seed(values_seed)
    for d in a.deltas.values():
        d.values = (torch.randn(d.count, generator=gen) * 0.05).to(torch.bfloat16)
    return a


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    build_tiny_model("llama", root / "base", torch.bfloat16, "100KB")
    a, b = _adapter(root / "base", 1), _adapter(root / "base", 2, values_seed=1)
    a.save(root / "a.spra")
    b.save(root / "b.spra")
    return root


def _model(root, dtype=torch.bfloat16):
    return transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=dtype)


def test_attach_equals_the_file_apply_and_detach_restores(llama):
    apply_adapter(
        open_checkpoint(llama / "base"), [("a", Adapter.load(llama / "a.spra"))], llama / "merged", overwrite=True
    )
    merged = _snapshot(transformers.AutoModelForCausalLM.from_pretrained(llama / "merged", dtype=torch.bfloat16))
    model = _model(llama)
    base = _snapshot(model)
    h = spra_tools.attach(model, llama / "a.spra")
    assert _same(model, merged)
    h.detach()
    assert _same(model, base)
    with spra_tools.attached(model, llama / "a.spra"):
        assert _same(model, merged)
    assert _same(model, base)


def test_wrong_base_is_refused_before_anything_changes(llama, tmp_path):
    build_tiny_model("llama", tmp_path / "other", torch.bfloat16, seed=7)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "other", dtype=torch.bfloat16)
    before = _snapshot(model)
    with pytest.raises(MismatchError, match="fingerprint"):
        spra_tools.attach(model, llama / "a.spra")
    assert _same(model, before) and not getattr(model, "_spra_handles", [])


def test_many_swaps_leave_the_base_exact(llama):
    model = _model(llama)
    base = _snapshot(model)
    a, b = Adapter.load(llama / "a.spra"), Adapter.load(llama / "b.spra")
    h = spra_tools.attach(model, a)
    for i in range(100):
        h = spra_tools.swap(h, b if i % 2 == 0 else a)
    h.detach()
    assert _same(model, base)


def test_several_adapters_detach_in_any_order(llama):
    """Overlapping supports (density 0.3): the model is always base + the rest in attach order."""
    root = llama
    adapters = [_adapter(root / "base", s, density=0.3, values_seed=s) for s in (11, 12, 13)]

    def reference(kept):
        m = _model(root)
        for a in kept:
            spra_tools.attach(m, a)
        return _snapshot(m)

    for order in [(1, 0, 2), (2, 1, 0), (0, 2, 1)]:
        model = _model(root)
        base = _snapshot(model)
        handles = [spra_tools.attach(model, a) for a in adapters]
        remaining = [0, 1, 2]
        for i in order:
            handles[i].detach()
            remaining.remove(i)
            assert _same(model, reference([adapters[j] for j in remaining])), (order, i)
        assert _same(model, base)


def test_model_held_in_fp32_accepts_a_bf16_adapter(llama):
    model = _model(llama, torch.float32)
    base = _snapshot(model)
    h = spra_tools.attach(model, llama / "a.spra")
    assert not _same(model, base)
    h.detach()
    assert _same(model, base)


def test_explicit_adapter_from_diff(llama, tmp_path):
    apply_adapter(open_checkpoint(llama / "base"), [("a", Adapter.load(llama / "a.spra"))], tmp_path / "tuned")
    extracted, _ = diff_checkpoints(open_checkpoint(llama / "base"), open_checkpoint(tmp_path / "tuned"))
    model = _model(llama)
    base = _snapshot(model)
    tuned = _snapshot(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned", dtype=torch.bfloat16))
    h = spra_tools.attach(model, extracted)
    assert _same(model, tuned)
    h.detach()
    assert _same(model, base)


def test_tied_weights_are_adapted_once(tmp_path):
    model0 = build_tiny_model("gpt2", tmp_path / "gpt2", torch.float32)
    assert model0.lm_head.weight is model0.transformer.wte.weight
    a = _adapter(tmp_path / "gpt2", 3, density=0.2, targets=("all",))
    assert "transformer.wte.weight" in a.deltas
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", dtype=torch.float32)
    base = _snapshot(model)
    h = spra_tools.attach(model, a)
    apply_adapter(open_checkpoint(tmp_path / "gpt2"), [("a", a)], tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert _same(model, _snapshot(merged))
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    h.detach()
    assert _same(model, base)


def test_mixed_dtypes_and_devices_form_groups(llama):
    model = _model(llama)
    model.model.layers[1].to(torch.float32)  # two weight dtypes: two groups, still exact
    devices = ["cpu"]
    if torch.cuda.is_available():
        model.model.layers[0].to("cuda")  # a device_map-style split across devices
        devices.append("cuda")
    base = _snapshot(model)
    h = spra_tools.attach(model, llama / "a.spra")
    assert len(h.groups) >= 2
    h.detach()
    assert _same(model, base)


def test_load_model_attaches(llama):
    model = spra_tools.load_model(llama / "base", llama / "a.spra", dtype=torch.bfloat16)
    apply_adapter(
        open_checkpoint(llama / "base"), [("a", Adapter.load(llama / "a.spra"))], llama / "merged2", overwrite=True
    )
    merged = transformers.AutoModelForCausalLM.from_pretrained(llama / "merged2", dtype=torch.bfloat16)
    assert _same(model, _snapshot(merged))
    assert model.spra_handle.attached


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_attach_on_fp16_and_fp32_bases(tmp_path, dtype):
    build_tiny_model("qwen2", tmp_path / "base", dtype)
    a = _adapter(tmp_path / "base", 5, density=0.1)
    apply_adapter(open_checkpoint(tmp_path / "base"), [("a", a)], tmp_path / "merged")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype)
    base = _snapshot(model)
    with spra_tools.attached(model, a):
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype)
        assert _same(model, _snapshot(merged))
    assert _same(model, base)


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_staged_swaps_are_exact_and_equal_a_fresh_attach(llama, tmp_path, device):
    base_dir = llama / "base"
    apply_adapter(open_checkpoint(base_dir), [("a", Adapter.load(llama / "a.spra"))], tmp_path / "tuned")
    explicit, _ = diff_checkpoints(open_checkpoint(base_dir), open_checkpoint(tmp_path / "tuned"))
    adapters = [Adapter.load(llama / "a.spra"), Adapter.load(llama / "b.spra"), explicit]
    expected = []  # base + each adapter, attached the ordinary way to a fresh model
    for a in adapters:
        fresh = _model(llama).to(device)
        spra_tools.attach(fresh, a, scale=0.5)
        expected.append(_snapshot(fresh))
    model = _model(llama).to(device)
    base = _snapshot(model)
    staged = [spra_tools.stage(model, a) for a in adapters]
    assert _same(model, base)  # staging changes nothing
    h = spra_tools.attach(model, staged[0], scale=0.5)
    assert _same(model, expected[0])
    for i in range(1, 61):
        h = spra_tools.swap(h, staged[i % 3])
        if i % 10 == 0 or i < 3:
            assert _same(model, expected[i % 3]), i
    h.detach()
    assert _same(model, base)


def test_staged_adapter_holds_values_and_int32_offsets(llama):
    model = _model(llama)
    a = Adapter.load(llama / "a.spra")
    staged = spra_tools.stage(model, a)
    assert all(g.indices.dtype == torch.int32 for g in staged.groups)
    assert staged.nbytes == a.num_values * (2 + 4)  # bf16 value + int32 offset each


def test_staging_against_a_wrong_base_is_refused(llama, tmp_path):
    build_tiny_model("llama", tmp_path / "other", torch.bfloat16, seed=7)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "other", dtype=torch.bfloat16)
    before = _snapshot(model)
    with pytest.raises(MismatchError, match="fingerprint"):
        spra_tools.stage(model, llama / "a.spra")
    assert _same(model, before) and not getattr(model, "_spra_handles", [])


def test_staged_while_attached_verifies_against_the_base(llama):
    """Staged while `a` is attached (overlapping supports): checked against the base, not base + a."""
    a = _adapter(llama / "base", 21, density=0.3, values_seed=1)
    b = _adapter(llama / "base", 22, density=0.3, values_seed=2)
    fresh = _model(llama)
    spra_tools.attach(fresh, b)
    model = _model(llama)
    h = spra_tools.attach(model, a)
    h = spra_tools.swap(h, spra_tools.stage(model, b))
    assert _same(model, _snapshot(fresh))


def test_staged_adapter_is_refused_by_another_or_a_converted_model(llama):
    model = _model(llama)
    staged = spra_tools.stage(model, llama / "a.spra")
    other = _model(llama)
    with pytest.raises(SpraError, match="another model"):
        spra_tools.attach(other, staged)
    model.to(torch.float32)
    before = _snapshot(model)
    with pytest.raises(SpraError, match="moved"):
        spra_tools.attach(model, staged)
    assert _same(model, before) and not getattr(model, "_spra_handles", [])


def _chain(root):
    """A on the base; B trained on base + A (created on the applied checkpoint, the same seed: every
    element of B's support was changed by A); C trained on the base beside A (the same support)."""
    a = _adapter(root / "base", 31, density=0.2, values_seed=3)
    apply_adapter(open_checkpoint(root / "base"), [("a", a)], root / "base+a", overwrite=True)
    b = _adapter(root / "base+a", 31, density=0.2, values_seed=4)
    c = _adapter(root / "base", 31, density=0.2, values_seed=5)
    return a, b, c


@pytest.mark.parametrize(
    "chain, accepted",
    [(("a", "b"), True), (("a", "c"), True), (("b",), False), (("c", "b"), False)],
    ids=["b-trained-on-a", "c-beside-a", "b-without-a", "b-after-c"],
)
def test_chains_follow_one_rule_in_apply_and_attach(llama, tmp_path, chain, accepted):
    """Each adapter must fit the weights it lands on, or else the base: apply and attach agree, and
    an accepted chain attached is the applied chain, bit for bit."""
    adapters = dict(zip("abc", _chain(llama)))
    ckpt = open_checkpoint(llama / "base")
    model = _model(llama)
    before = _snapshot(model)
    if not accepted:
        with pytest.raises(MismatchError, match="fingerprint"):
            apply_adapter(ckpt, [(n, adapters[n]) for n in chain], tmp_path / "merged")
        assert not (tmp_path / "merged").exists()
        for n in chain[:-1]:
            spra_tools.attach(model, adapters[n])
        attached = _snapshot(model)
        with pytest.raises(MismatchError, match="fingerprint"):
            spra_tools.attach(model, adapters[chain[-1]])
        assert _same(model, attached) and len(model._spra_handles) == len(chain) - 1
        return
    apply_adapter(ckpt, [(n, adapters[n]) for n in chain], tmp_path / "merged")
    merged = _snapshot(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16))
    handles = [spra_tools.attach(model, adapters[n]) for n in chain]
    assert not _same(model, before) and _same(model, merged)
    for h in handles:
        h.detach()
    assert _same(model, before)


def test_a_swap_checks_the_weights_it_lands_on_and_a_refused_one_changes_nothing(llama):
    """B was trained on base + A: swapping A for B would land B on the base, which B does not fit."""
    a, b, c = _chain(llama)
    model = _model(llama)
    first = spra_tools.attach(model, c)
    middle = spra_tools.attach(model, a)
    last = spra_tools.attach(model, _adapter(llama / "base", 33, density=0.2, values_seed=6))
    attached = _snapshot(model)
    with pytest.raises(MismatchError, match="fingerprint"):
        spra_tools.swap(middle, b)
    assert _same(model, attached) and model._spra_handles == [first, middle, last] and middle.attached
    last.detach()
    new = spra_tools.swap(first, b)  # lands on base + a: fits
    assert model._spra_handles == [middle, new]


def test_handles_and_staged_adapters_print_short(llama):
    model = _model(llama)
    adapter = Adapter.load(llama / "a.spra")
    h = spra_tools.attach(model, adapter)
    text = repr(h)
    assert text == f"Handle({len(adapter.deltas)} tensors, {adapter.num_values:,} values, scale=1, attached)"
    h.detach()
    assert repr(h).endswith("detached)")
    staged = spra_tools.stage(model, adapter)
    assert repr(staged) == (
        f"Staged({len(adapter.deltas)} tensors, {adapter.num_values:,} values, {staged.nbytes:,} bytes on cpu)"
    )
