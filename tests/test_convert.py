"""Interop with peft-sparta (read, write, round trip, judged by the real package) and LoRA -> sparse.

The oracles are the real packages: peft-sparta's own SpaRTA class (its save and its merge) and its
loader SpaRTAforCausalLM; PEFT's get_peft_model / merge_and_unload for LoRA.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from spra_tools.adapter import Adapter
from spra_tools.algebra import diff_checkpoints
from spra_tools.algebra.convert import lora_to_sparse, read_peft_sparta, write_peft_sparta
from spra_tools.checkpoint import open_checkpoint
from spra_tools.dtypes import bit_view
from spra_tools.errors import SpraError
from spra_tools.surgery import apply_adapter
from spra_tools.testing import build_tiny_model, fine_tune

try:
    import peft_sparta
except ImportError:  # the dev extra installs it
    peft_sparta = None
needs_sparta = pytest.mark.skipif(peft_sparta is None, reason="peft-sparta is not installed")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def pair(request, tmp_path_factory):
    """A tiny Llama base, a fine-tune of it, and our exact fp32-valued diff adapter."""
    dtype = request.param
    root = tmp_path_factory.mktemp("sparta")
    model = build_tiny_model("llama", root / "base", dtype)
    fine_tune(model, seed=1)
    model.save_pretrained(root / "tuned")
    base = open_checkpoint(root / "base")
    adapter, _ = diff_checkpoints(base, open_checkpoint(root / "tuned"), values_dtype="F32")
    return root, dtype, base, adapter


def _model_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def _assert_equal_to_checkpoint(params: dict[str, torch.Tensor], ckpt) -> None:
    for name, p in params.items():
        assert torch.equal(bit_view(p.contiguous()), bit_view(ckpt.read(name))), name


def test_round_trip_is_exact(pair, tmp_path):
    root, _, base, adapter = pair
    write_peft_sparta(adapter, tmp_path / "ps", str(root / "base"))
    back = read_peft_sparta(tmp_path / "ps", base)
    assert back.exact and back.provenance["from"] == "peft-sparta"
    assert set(back.deltas) == set(adapter.deltas)
    for name, d in adapter.deltas.items():
        b = back.deltas[name]
        assert torch.equal(b.indices(), d.indices()), name
        assert torch.equal(bit_view(b.values), bit_view(d.values.float())), name
        assert b.fingerprint == d.fingerprint
    apply_adapter(base, [("a", adapter)], tmp_path / "ours", overwrite=True)
    apply_adapter(base, [("b", back)], tmp_path / "back", overwrite=True)
    ours, theirs = open_checkpoint(tmp_path / "ours"), open_checkpoint(tmp_path / "back")
    for name in base.names():
        assert torch.equal(bit_view(ours.read(name)), bit_view(theirs.read(name))), name


class _LoadAs:
    """Stands in for transformers.AutoModelForCausalLM inside peft_sparta.loader: the loader hard-codes
    bf16, so an fp32 base is otherwise rounded before its deltas land."""

    def __init__(self, dtype):
        self.dtype = dtype

    def from_pretrained(self, path, **kwargs):
        kwargs.pop("torch_dtype", None)
        return transformers.AutoModelForCausalLM.from_pretrained(path, **{**kwargs, "dtype": self.dtype})


@needs_sparta
def test_real_loader_builds_our_apply(pair, tmp_path, monkeypatch):
    """SpaRTAforCausalLM on what we write == our apply_adapter, bit for bit (its merge is our rule)."""
    root, dtype, base, adapter = pair
    write_peft_sparta(adapter, tmp_path / "ps", str(root / "base"))
    apply_adapter(base, [("a", adapter)], tmp_path / "ours", overwrite=True)
    ours = open_checkpoint(tmp_path / "ours")
    if dtype == torch.float32:
        monkeypatch.setattr(peft_sparta.loader, "AutoModelForCausalLM", _LoadAs(torch.float32))
    loaded = peft_sparta.SpaRTAforCausalLM(str(tmp_path / "ps"))
    state = _model_state(loaded.base_model)
    assert all(p.dtype == dtype for p in state.values())
    _assert_equal_to_checkpoint(state, ours)
    # And the whole fine-tune came back (the diff was exact).
    _assert_equal_to_checkpoint(state, open_checkpoint(root / "tuned"))


@needs_sparta
def test_unpatched_loader_rounds_an_fp32_base_to_bf16(pair, tmp_path):
    """The loader as shipped: bf16(fp32(bf16(w)) + v) -- our rule applied to the bf16 base."""
    root, dtype, base, adapter = pair
    if dtype != torch.float32:
        pytest.skip("only meaningful for an fp32 base")
    write_peft_sparta(adapter, tmp_path / "ps", str(root / "base"))
    state = _model_state(peft_sparta.SpaRTAforCausalLM(str(tmp_path / "ps")).base_model)
    for name, p in state.items():
        expect = base.read(name).to(torch.bfloat16)
        if name in adapter.deltas:
            d = adapter.deltas[name]
            flat = expect.reshape(-1)
            idx = d.indices()
            flat[idx] = (flat[idx].float() + d.values.float()).to(torch.bfloat16)
        assert p.dtype == torch.bfloat16 and torch.equal(bit_view(p), bit_view(expect)), name


@needs_sparta
def test_read_what_the_real_package_saves(pair, tmp_path):
    """SpaRTA(...).save(merged=False) on a tiny model; our read + apply == its own merged weights."""
    root, dtype, base, _ = pair
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=dtype)
    torch.manual_seed(0)
    sparse = peft_sparta.SpaRTA(model, sparsity=0.9, frozen_modules=["norm"])
    with torch.no_grad():
        for d in sparse.deltas.values():
            d.copy_(torch.randn_like(d) * 0.02)
    (tmp_path / "saved").mkdir()
    sparse.save(str(tmp_path / "saved"), merged=False)
    sparse.eval()  # merges its deltas into the model
    adapter = read_peft_sparta(tmp_path / "saved", base)
    assert adapter.num_values == sum(d.numel() for d in sparse.deltas.values())
    apply_adapter(base, [("saved", adapter)], tmp_path / "ours", overwrite=True)
    _assert_equal_to_checkpoint(_model_state(sparse.model), open_checkpoint(tmp_path / "ours"))


def test_names_with_wrapper_prefixes_and_legacy_pt(pair, tmp_path):
    root, _, base, adapter = pair
    write_peft_sparta(adapter, tmp_path / "ps", str(root / "base"))
    import safetensors.torch

    tensors = safetensors.torch.load_file(tmp_path / "ps" / "sparse_deltas.safetensors")
    doc = {"indices": {}, "deltas": {}}
    for key, t in tensors.items():
        kind, _, name = key.partition(".")
        doc[kind]["base_model." + name.removesuffix(".weight")] = t.clone()
    (tmp_path / "ps" / "sparse_deltas.safetensors").unlink()
    torch.save(doc, tmp_path / "ps" / "sparse_deltas.pt")
    back = read_peft_sparta(tmp_path / "ps", base)
    assert set(back.deltas) == set(adapter.deltas)


def test_classification_head_round_trip(pair, tmp_path):
    root, _, base, adapter = pair
    head = torch.randn(3, 64)
    with_head = Adapter(dict(adapter.deltas), {"score.weight": head}, adapter.base, {"labels": ["a", "b", "c"]})
    write_peft_sparta(with_head, tmp_path / "ps", str(root / "base"))
    cfg = json.loads((tmp_path / "ps" / "config.json").read_text())
    assert cfg["problem_type"] == "single_label_classification" and cfg["id2label"]["2"] == "c"
    back = read_peft_sparta(tmp_path / "ps", base)
    assert torch.equal(back.dense["score.weight"], head) and back.task["labels"] == ["a", "b", "c"]


# ------------------------------------------------------------------------------------------ bad inputs


def _rewrite(path, edit):
    import safetensors.torch

    tensors = safetensors.torch.load_file(path)
    edit(tensors)
    safetensors.torch.save_file(tensors, path)


def _some(tensors, kind):
    return next(k for k, t in tensors.items() if k.startswith(kind) and t.shape[0] > 1)


BAD = {
    "missing deltas file": lambda p: (p / "sparse_deltas.safetensors").unlink(),
    "missing config": lambda p: (p / "config.json").unlink(),
    "corrupt safetensors": lambda p: (p / "sparse_deltas.safetensors").write_bytes(b"\x10\x00garbage"),
    "truncated safetensors": lambda p: (p / "sparse_deltas.safetensors").write_bytes(
        (p / "sparse_deltas.safetensors").read_bytes()[:-100]
    ),
    "unknown name": lambda p: _rewrite(
        p / "sparse_deltas.safetensors",
        lambda t: t.update(
            {"indices.nope.weight": torch.zeros(1, 2, dtype=torch.int32), "deltas.nope.weight": torch.zeros(1)}
        ),
    ),
    "wrong index width": lambda p: _rewrite(
        p / "sparse_deltas.safetensors", lambda t: t.update({(k := _some(t, "indices")): t[k][:, :1].contiguous()})
    ),
    "index out of range": lambda p: _rewrite(
        p / "sparse_deltas.safetensors", lambda t: t.update({(k := _some(t, "indices")): t[k] + 10_000})
    ),
    "duplicate index": lambda p: _rewrite(
        p / "sparse_deltas.safetensors",
        lambda t: t.update({(k := _some(t, "indices")): torch.cat([t[k][:1], t[k][:1], t[k][2:]]).contiguous()}),
    ),
    "deltas length": lambda p: _rewrite(
        p / "sparse_deltas.safetensors", lambda t: t.update({(k := _some(t, "deltas")): t[k][:-1].contiguous()})
    ),
    "stray key": lambda p: _rewrite(p / "sparse_deltas.safetensors", lambda t: t.update({"other": torch.zeros(1)})),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_peft_sparta_inputs_name_the_file(case, pair, tmp_path):
    root, _, base, adapter = pair
    write_peft_sparta(adapter, tmp_path / "ps", str(root / "base"))
    BAD[case](tmp_path / "ps")
    with pytest.raises(SpraError) as err:
        read_peft_sparta(tmp_path / "ps", base)
    assert err.value.path is not None and str(tmp_path / "ps") in err.value.path, err.value


def test_write_refuses_other_dense_and_existing_output(pair, tmp_path):
    root, _, base, adapter = pair
    bad = Adapter(dict(adapter.deltas), {"model.norm.weight": torch.ones(64)})
    with pytest.raises(SpraError, match="no peft-sparta form"):
        write_peft_sparta(bad, tmp_path / "x", str(root / "base"))
    assert not (tmp_path / "x").exists()
    write_peft_sparta(adapter, tmp_path / "ps", str(root / "base"))
    with pytest.raises(SpraError, match="exists"):
        write_peft_sparta(adapter, tmp_path / "ps", str(root / "base"))


# ------------------------------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module", params=[("llama", False), ("llama", True), ("gpt2", False)], ids=str)
def lora(request, tmp_path_factory):
    """A real PEFT LoRA (random lora_B) on an fp32 tiny model, saved, and its merge_and_unload weights."""
    peft = pytest.importorskip("peft")
    arch, rslora = request.param
    root = tmp_path_factory.mktemp("lora")
    model = build_tiny_model(arch, root / "base", torch.float32)
    targets = ["c_attn", "c_proj"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora, init_lora_weights=True)
    pm = peft.get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    pm.save_pretrained(root / "lora")
    merged = {n: p.detach().clone() for n, p in pm.merge_and_unload().state_dict().items()}
    return root, open_checkpoint(root / "base"), merged


def test_lora_matches_peft_merge(lora, tmp_path):
    root, base, merged = lora
    adapter = lora_to_sparse(root / "lora", base, density=None)
    assert adapter.deltas and adapter.provenance["retained_total"] == 1.0
    apply_adapter(base, [("lora", adapter)], tmp_path / "out", overwrite=True)
    out = open_checkpoint(tmp_path / "out")
    changed = 0
    for name in base.names():
        got, want = out.read(name), merged[name]
        # ΔW is computed as PEFT computes it (fp32 (B @ A), transposed, times scale) and added in
        # fp32 like its unsafe merge, so the results agree bit for bit on one machine. A different
        # matmul kernel could reorder the r-term sums: each term then moves by at most an ulp of
        # |ΔW|, far below 1e-6 at these magnitudes -- the tolerance kept as a fallback bound.
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
        changed += int(not torch.equal(got, base.read(name)))
    assert changed == len(adapter.deltas)


def test_lora_with_density_keeps_the_largest(lora):
    root, base, merged = lora
    adapter = lora_to_sparse(root / "lora", base, density=0.1)
    for name, d in adapter.deltas.items():
        full = (merged[name].double() - base.read(name).double()).reshape(-1).abs()
        assert d.count == int(0.1 * full.numel())
        kept = torch.zeros(full.numel(), dtype=torch.bool)
        kept[d.indices()] = True
        assert full[kept].min() >= full[~kept].max() - 1e-6
        assert 0.0 < adapter.provenance["retained"][name] < 1.0
    assert 0.0 < adapter.provenance["retained_total"] < 1.0


def test_lora_bad_inputs(lora, tmp_path):
    root, base, _ = lora
    import shutil

    shutil.copytree(root / "lora", tmp_path / "l")
    cfg = json.loads((tmp_path / "l" / "adapter_config.json").read_text())
    (tmp_path / "l" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 3}))
    with pytest.raises(SpraError, match="rank"):
        lora_to_sparse(tmp_path / "l", base, None)
    (tmp_path / "l" / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(SpraError, match="adapter_model.safetensors"):
        lora_to_sparse(tmp_path / "l", base, None)
    with pytest.raises(SpraError, match="adapter_config.json"):
        lora_to_sparse(tmp_path, base, None)


def _tiny_tokenizer(directory) -> None:
    """A 256-token word-level tokenizer (the loader checks len(tokenizer) == vocab_size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(255)} | {"<unk>": 255}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")
    fast.save_pretrained(directory)


@needs_sparta
def test_real_classification_loader_uses_our_head(pair, tmp_path):
    """SpaRTAforSequenceClassification on what we write: body == our apply, head == our dense head."""
    root, dtype, base, adapter = pair
    if dtype != torch.bfloat16:
        pytest.skip("the loader loads the body in bf16; the fp32 case is covered by the causal loader")
    head = torch.randn(2, 64)
    with_head = Adapter(dict(adapter.deltas), {"score.weight": head}, adapter.base, {"labels": ["no", "yes"]})
    write_peft_sparta(with_head, tmp_path / "ps", str(root / "base"))
    _tiny_tokenizer(tmp_path / "ps")
    loaded = peft_sparta.SpaRTAforSequenceClassification(str(tmp_path / "ps"))
    assert torch.equal(loaded.head.weight.detach(), head)
    apply_adapter(base, [("a", adapter)], tmp_path / "ours", overwrite=True)
    body = {f"{loaded.base_model.base_model_prefix}.{n}": p for n, p in _model_state(loaded.base_model).items()}
    _assert_equal_to_checkpoint(body, open_checkpoint(tmp_path / "ours"))


def test_cli_convert_detects_the_source_and_round_trips(lora, tmp_path):
    """`convert` on a LoRA directory (auto-detected, base from its config or --base), then .spra ->
    peft-sparta -> .spra through the CLI: same values and supports."""
    from click.testing import CliRunner

    from spra_tools.cli import cli

    root, base, _ = lora
    run = CliRunner()
    r = run.invoke(cli, ["convert", str(root / "lora"), "-o", str(tmp_path / "l.spra"), "--base", str(root / "base")])
    assert r.exit_code == 0, r.output
    r = run.invoke(cli, ["convert", str(tmp_path / "l.spra"), "-o", str(tmp_path / "ps"), "--base", str(root / "base")])
    assert r.exit_code == 0, r.output
    r = run.invoke(cli, ["convert", str(tmp_path / "ps"), "-o", str(tmp_path / "back.spra")])  # base from config.json
    assert r.exit_code == 0, r.output
    a, b = Adapter.load(tmp_path / "l.spra"), Adapter.load(tmp_path / "back.spra")
    assert list(a.deltas) == list(b.deltas)
    for name, d in a.deltas.items():
        assert np.array_equal(d.indices().numpy(), b.deltas[name].indices().numpy())
        assert torch.equal(d.values.float(), b.deltas[name].values.float())


def test_detect_source_by_the_files_present(tmp_path):
    from spra_tools.algebra.convert import SOURCES, TARGETS, detect_source
    from spra_tools.cli import convert

    (tmp_path / "a.spra").write_bytes(b"")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    (tmp_path / "ps").mkdir()
    found = [detect_source(tmp_path / p) for p in ("a.spra", "lora", "ps")]
    assert found == ["spra", "lora", "peft-sparta"] and set(found) == set(SOURCES)
    choices = {p.name: list(p.type.choices) for p in convert.params if p.name in ("source", "target")}
    assert choices == {"source": ["auto", *SOURCES], "target": list(TARGETS)}
