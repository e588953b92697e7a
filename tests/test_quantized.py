"""SpaRTA on quantized bases (bitsandbytes NF4 / FP4 with and without double quantization, int8;
torchao int8 / int4 weight-only) as transformers loads them.

The sparse term on a quantized layer is checked against an independent reference in fp32: the
layer's dequantized weight plus the dense delta, through torch autograd (output, input gradient,
delta gradient at the support). Training lowers the loss and SparseAdamW matches torch.optim.AdamW
on the deltas; the adapter describes the full-precision checkpoint (verify / apply against it),
attaches unmerged to the quantized model (load_model with a quantization_config), and a wrong base
is refused. What does not run on the CPU here is skipped, saying why; GPU cases are marked cuda.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers

from spra_tools import quantized
from spra_tools.adapter import Adapter
from spra_tools.checkpoint import open_checkpoint
from spra_tools.errors import MismatchError, SpraError
from spra_tools.live import attach, load_model
from spra_tools.surgery import apply_adapter, verify_adapter
from spra_tools.testing import CORPUS, build_tiny_model, build_word_tokenizer
from spra_tools.train import SparseAdamW, SparseModel

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAVE_TORCHAO = importlib.util.find_spec("torchao") is not None
HAVE_CUDA = torch.cuda.is_available()


def _bnb(**settings):
    return lambda: transformers.BitsAndBytesConfig(**settings, bnb_4bit_compute_dtype=torch.bfloat16)


def _torchao(kind: str, **settings):
    def make():
        import torchao.quantization as q

        return transformers.TorchAoConfig(getattr(q, kind)(**settings))

    return make


# name -> (config factory, needs, devices it runs on here); one table feeds every test.
QUANTIZATIONS = {
    "nf4": (_bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4"), HAVE_BNB, ("cpu", "cuda")),
    "nf4-dq": (
        _bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
        HAVE_BNB,
        ("cpu", "cuda"),
    ),
    "fp4": (_bnb(load_in_4bit=True, bnb_4bit_quant_type="fp4"), HAVE_BNB, ("cpu", "cuda")),
    "fp4-dq": (
        _bnb(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
        HAVE_BNB,
        ("cpu", "cuda"),
    ),
    "int8": (_bnb(load_in_8bit=True), HAVE_BNB, ("cpu", "cuda")),
    "torchao-int8": (_torchao("Int8WeightOnlyConfig"), HAVE_TORCHAO, ("cpu", "cuda")),
    # torchao 0.18's int4 weight-only packings are CUDA kernels' (tinygemm here; "plain" needs mslk): GPU only.
    "torchao-int4": (
        _torchao("Int4WeightOnlyConfig", group_size=32, int4_packing_format="tile_packed_to_4d"),
        HAVE_TORCHAO,
        ("cuda",),
    ),
}


def _cases():
    for name, (_, available, devices) in QUANTIZATIONS.items():
        for device in ("cpu", "cuda"):
            marks = [pytest.mark.cuda] if device == "cuda" else []
            if not available:
                marks.append(pytest.mark.skip(reason=f"{name}: its package is not installed (spra-tools[quant])"))
            elif device not in devices:
                marks.append(pytest.mark.skip(reason=f"{name} does not run on {device}"))
            elif device == "cuda" and not HAVE_CUDA:
                marks.append(pytest.mark.skip(reason="no CUDA device"))
            yield pytest.param(name, device, marks=marks, id=f"{name}-{device}")


CASES = list(_cases())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny bf16 Llama whose linears have 128 inputs (bitsandbytes' 4-bit blocks are 64 wide)."""
    path = tmp_path_factory.mktemp("qbase") / "base"
    build_tiny_model("llama", path, dtype=torch.bfloat16, hidden=128, seed=3)
    return path


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("qother") / "base"
    build_tiny_model("llama", path, dtype=torch.bfloat16, hidden=128, seed=4)
    return path


def _load(path, name: str, device: str):
    config = QUANTIZATIONS[name][0]()
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=torch.bfloat16, device_map={"": device}
    )


def _randomize(sm: SparseModel, seed: int = 0, scale: float = 0.02) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sm.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


@pytest.mark.parametrize("name, device", CASES)
def test_every_linear_is_recognised(base, name, device):
    model = _load(base, name, device)
    layers = quantized.quantized_layers(model)
    assert len(layers) == 14  # 2 layers x (q, k, v, o, gate, up, down); the head stays unquantized
    ckpt = open_checkpoint(base)
    for weight, module in layers.items():
        deq = quantized.dequantized(module).cpu()
        assert deq.shape == quantized.logical_shape(module) == (module.out_features, module.in_features)
        want = ckpt.read(weight).float()  # dequantizing gives the checkpoint back within quantization error
        assert 0 < (deq - want).norm() / want.norm() < 0.25


@pytest.mark.parametrize("product", quantized.PRODUCTS)
@pytest.mark.parametrize("name, device", CASES)
def test_sparse_term_matches_dequantized_reference(base, name, device, product, monkeypatch):
    """y = base(x) + x·Δᵀ and both gradients, against fp32 autograd over dequantized W + dense Δ,
    with the sparse term's products by the sparse kernel and as dense GEMMs."""
    monkeypatch.setenv(quantized.PRODUCT_VARIABLE, product)
    model = _load(base, name, device)
    sm = SparseModel(model, density=0.05, seed=7, targets=["all-linear"])
    _randomize(sm, scale=0.05)
    gen = torch.Generator().manual_seed(1)
    for weight_name in ("model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        module = quantized.quantized_layers(model)[weight_name]
        delta = sm.deltas[weight_name.replace(".", "/")]
        idx = next(s[3] for s in sm.sites() if s[0] == weight_name)
        x = torch.randn(2, 5, module.in_features, generator=gen).to(device, torch.bfloat16).requires_grad_()
        g = torch.randn(2, 5, module.out_features, generator=gen).to(device, torch.bfloat16)
        y = module(x)
        (y.float() * g.float()).sum().backward()

        w = quantized.dequantized(module).float().reshape(-1).clone()
        dense = torch.zeros_like(w)
        dense[idx] = delta.detach().float()
        w_ref = (w + dense).reshape(module.out_features, module.in_features)
        dense_ref = dense.reshape(w_ref.shape).requires_grad_()
        xr = x.detach().float().requires_grad_()
        yr = xr @ (w_ref.detach() + dense_ref - dense_ref.detach()).t()
        (yr * g.float()).sum().backward()

        # bf16 in and out: the quantized layers compute in bf16, so compare at bf16 resolution
        scale = yr.abs().max().item()
        assert (y.float() - yr).abs().max().item() <= 0.02 * scale
        assert (x.grad.float() - xr.grad).abs().max().item() <= 0.02 * xr.grad.abs().max().item()
        want = dense_ref.grad.reshape(-1)[idx]
        assert torch.allclose(delta.grad, want, rtol=0.02, atol=0.02 * want.abs().max().item())
        delta.grad = None


@pytest.mark.parametrize("name, device", CASES)
def test_training_lowers_the_loss_and_adamw_matches_torch(base, name, device):
    model = _load(base, name, device)
    sm = SparseModel(model, density=0.05, seed=7, targets=["all-linear"])
    opt = SparseAdamW(sm, lr=1e-2, weight_decay=0.01, max_grad_norm=0.5)
    shadow = [p.detach().clone() for p in sm.parameters()]
    reference = torch.optim.AdamW(shadow, lr=1e-2, weight_decay=0.01)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    losses = []
    for _ in range(8):
        loss = sm(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad.clone() for p in sm.parameters()]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        for s, g in zip(shadow, grads):
            s.grad = g * (0.5 / (norm + 1e-6)).clamp(max=1.0)
        opt.step()
        reference.step()
        opt.zero_grad()
        losses.append(loss.item())
        for p, s in zip(sm.parameters(), shadow):
            assert torch.allclose(p, s, rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0] - 0.05
    weights = [p for p in model.parameters()]
    assert all(not w.requires_grad for w in weights)


@pytest.mark.parametrize("name, device", CASES)
def test_adapter_describes_the_full_precision_base(base, other_base, name, device, tmp_path):
    model = _load(base, name, device)
    sm = SparseModel(model, density=0.05, seed=7, targets=["vo"])
    _randomize(sm, scale=0.05)
    path = tmp_path / "task.spra"
    sm.save(path, values_dtype=torch.float32)
    adapter = Adapter.load(path)
    assert adapter.base["name"] == str(base)
    assert adapter.provenance["quantization"]["quant_method"] in ("bitsandbytes", "torchao")
    for d in adapter.deltas.values():
        assert d.dtype == torch.bfloat16 and len(d.shape) == 2
    assert verify_adapter(open_checkpoint(base), adapter) == []
    assert verify_adapter(open_checkpoint(other_base), adapter)  # a wrong base is refused
    apply_adapter(open_checkpoint(base), [(str(path), adapter)], tmp_path / "merged")
    merged, ckpt = open_checkpoint(tmp_path / "merged"), open_checkpoint(base)
    for tensor, d in adapter.deltas.items():
        idx = d.indices()
        want = (ckpt.view(tensor).reshape(-1)[idx].float() + d.values.float()).to(torch.bfloat16)
        assert torch.equal(merged.view(tensor).reshape(-1)[idx], want)

    # Unmerged on the quantized model: the same logits as the trained model (fp32 values saved).
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        trained = sm(input_ids=ids).logits
    config = QUANTIZATIONS[name][0]()
    served = load_model(base, path, quantization_config=config, dtype=torch.bfloat16, device_map={"": device})
    with torch.no_grad():
        got = served(input_ids=ids).logits
    torch.testing.assert_close(got, trained, rtol=0, atol=0)
    plain = _load(base, name, device)
    with torch.no_grad():
        before = plain(input_ids=ids).logits
    assert not torch.equal(before, got)
    served.spra_handle.detach()
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, before, rtol=0, atol=0)

    # A wrong base: its checkpoint's fingerprints, or its quantized weights, do not match.
    with pytest.raises(MismatchError):
        load_model(other_base, path, quantization_config=config, dtype=torch.bfloat16, device_map={"": device})
    wrong = _load(other_base, name, device)
    with pytest.raises(MismatchError, match="quantized weights differ"):
        SparseModel(wrong, density=0.05, seed=7, targets=["vo"], base=base)
    wrong.config.name_or_path = str(base)  # claims the right checkpoint; its weights say otherwise
    with pytest.raises(MismatchError, match="quantized weights differ"):
        attach(wrong, path)


@pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed (spra-tools[quant])")
def test_merged_is_refused_and_the_base_must_be_found(base, monkeypatch):
    model = _load(base, "nf4", "cpu")
    monkeypatch.setenv(quantized.PRODUCT_VARIABLE, "sideways")
    with pytest.raises(SpraError, match=quantized.PRODUCT_VARIABLE):
        SparseModel(model, density=0.05, seed=7)
    monkeypatch.delenv(quantized.PRODUCT_VARIABLE)
    with pytest.raises(SpraError, match="missing"):
        SparseModel(model, density=0.05, seed=7, base=base / "missing")
    sm = SparseModel(model, density=0.05, seed=7)
    with pytest.raises(SpraError, match="in place"):
        sm.merged()


def _corpus_loss(model, tokenizer, lines) -> float:
    with torch.no_grad():
        losses = [model(**tokenizer(t, return_tensors="pt"), labels=tokenizer(t, return_tensors="pt")["input_ids"])
                  .loss.item() for t in lines]  # fmt: skip
    return sum(losses) / len(losses)


@pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed (spra-tools[quant])")
def test_train_quantize_writes_an_adapter_of_the_full_precision_base(tmp_path, call_cli):
    """NF4 base with gradient checkpointing; the head stays unquantized and trains in place beside it."""
    words = CORPUS.split()
    build_tiny_model("llama", tmp_path / "base", torch.bfloat16, hidden=128)
    build_word_tokenizer(words, tmp_path / "base")
    lines = [" ".join(words[i : i + 16]) for i in range(0, len(words) - 16, 4)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    rc, _, err = call_cli("train", tmp_path / "base", "--data", tmp_path / "corpus.jsonl", "-o", tmp_path / "a.spra",
                          "--steps", "30", "--lr", "1e-2", "--density", "0.05", "--targets", "all-linear",
                          "--targets", r"lm_head\.weight$", "--schedule", "constant", "--device", "cpu",
                          "--quantize", "nf4", "--gradient-checkpointing")  # fmt: skip
    assert rc == 0, err
    adapter = Adapter.load(tmp_path / "a.spra")
    assert adapter.provenance["config"]["quantize"] == "nf4"
    assert adapter.provenance["quantization"]["bnb_4bit_quant_type"] == "nf4"
    assert "lm_head.weight" in adapter.deltas and "model.layers.1.mlp.up_proj.weight" in adapter.deltas
    ckpt = open_checkpoint(tmp_path / "base")
    assert verify_adapter(ckpt, adapter) == []
    apply_adapter(ckpt, [("a", adapter)], tmp_path / "merged")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "base")
    before = _corpus_loss(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tokenizer, lines)
    after = _corpus_loss(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), tokenizer, lines)
    assert after < before - 1.0, (before, after)


@pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed (spra-tools[quant])")
def test_unmerged_adapters_stack_and_detach_in_any_order(base, tmp_path):
    """Two adapters on an NF4 model: detaching the first leaves exactly "base + the second"."""
    from spra_tools.live import stage, swap
    from spra_tools.multi import MultiAdapter

    paths = []
    for seed in (1, 2):
        sm = SparseModel(_load(base, "nf4", "cpu"), density=0.05, seed=seed, targets=["vo"])
        _randomize(sm, seed=seed, scale=0.05)
        paths.append(tmp_path / f"a{seed}.spra")
        sm.save(paths[-1])
    model = _load(base, "nf4", "cpu")
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(3))

    def logits():
        with torch.no_grad():
            return model(input_ids=ids).logits

    plain = logits()
    second = attach(model, paths[1])
    only_second = logits()
    second.detach()
    assert torch.equal(logits(), plain)
    first, second = attach(model, paths[0]), attach(model, paths[1])
    assert not torch.equal(logits(), only_second)
    first.detach()
    assert torch.equal(logits(), only_second)
    third = swap(second, stage(model, paths[0]))  # a staged adapter swaps in without re-verifying
    with torch.no_grad():
        attach(served := _load(base, "nf4", "cpu"), paths[0])
        assert torch.equal(logits(), served(input_ids=ids).logits)
    third.detach()
    assert torch.equal(logits(), plain)
    with pytest.raises(SpraError, match="quantized"):
        MultiAdapter(model).load("a", paths[0])
