"""The conformance matrix: every verb on tiny models of real transformers families, in the layouts
the Hub holds (tests/families.py), one table of cases x the properties below.

Each property is judged by a reference outside spra-tools: transformers itself (what it loads,
which parameters it reports as newly initialized, its logits and its own autograd gradients, its
model <-> checkpoint name conversion), the checkpoint's bits read back, or peft-sparta's loader.

Checkpoints, adapters and trained models are built once per session and shared by the properties
(`Store`). A (property, case) that fails today is listed in `KNOWN_FAILURES` with its root cause
and runs as ``xfail(strict=True)``: a fix turns it into XPASS, which fails until the entry is
removed. `scripts/architectures_table.py` renders the same table for the README.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from families import CASES, LABELS, PAD, VOCAB, Case, write_data

from spra_tools.adapter import Adapter
from spra_tools.algebra import diff_checkpoints, merge_adapters
from spra_tools.algebra.convert import read_peft_sparta, write_peft_sparta
from spra_tools.checkpoint import open_checkpoint
from spra_tools.dtypes import bit_view as bits
from spra_tools.live import attach
from spra_tools.share import export_adapter
from spra_tools.surgery import apply_adapter, create_adapter, verify_adapter
from spra_tools.testing import fine_tune
from spra_tools.train import SparseAdamW, SparseModel
from spra_tools.train.config import TrainConfig
from spra_tools.train.loop import train

DENSITY, STEPS = 0.05, 2
ID2LABEL = dict(enumerate(LABELS))

# --------------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Item:
    """One cell: a property of a case, for one training task or one model class where that matters."""

    prop: str
    case: Case
    variant: str = ""  # a task ("causal-lm" / "seq-cls"), a preset, or which model class attaches

    @property
    def id(self) -> str:
        return f"{self.case.id}-{self.variant}" if self.variant else self.case.id


# Which verb of the README table each property belongs to.
VERBS = {
    "create": "create",
    "train": "train",
    "train-head": "train",
    "train-verify": "train",
    "train-forward": "train",
    "train-grad": "train",
    "apply": "apply",
    "apply-config": "apply",
    "attach": "attach/detach",
    "merge": "merge",
    "diff": "diff",
    "export": "export",
    "convert": "convert",
}


def _variants(prop: str, case: Case) -> list[str]:
    tasks = list(case.tasks)
    return {
        "create": ["vo", "all-linear"],
        "train": tasks,
        "train-head": [t for t in tasks if t == "seq-cls"],
        "train-verify": tasks,
        "train-forward": tasks,
        "train-grad": tasks,
        "apply": tasks,
        "apply-config": [t for t in tasks if t == "seq-cls"],
        # The class that wrote the checkpoint, and the seq-cls class over it (a bare base needs a prefix).
        "attach": ["own"] + (["seq-cls"] if case.family.seq_cls else []),
        "merge": [""],
        "diff": [""],
        "export": [""],
        # peft-sparta's layout is a causal LM's named_parameters (its SpaRTAforCausalLM loader).
        "convert": ["causal-lm"] if "causal-lm" in tasks else [],
    }[prop]


def matrix() -> list[Item]:
    return [Item(p, c, v) for p in VERBS for c in CASES for v in _variants(p, c)]


_TRAINED = ("train", "train-head", "train-verify", "train-forward", "train-grad", "apply", "apply-config")
_ENCODERS = r"^(bert|roberta|deberta_v2|distilbert|modernbert|electra)-"
_MOE = r"^(mixtral|qwen3_moe)-"

# Root causes of today's failures, one line each, naming the code that falls short.
BIAS = ("the new head's biases and norms (classifier.bias, classifier.dense.bias, pooler.dense.bias, "
        "pre_classifier.bias, head.norm.weight) cannot train densely: SparseModel patches only "
        "Linear/Conv1D/Embedding weights (sparse_model._weight_holders)")  # fmt: skip
ROUTER = ("MoE: all-linear selects the router mlp.gate.weight, a bare nn.Parameter of *TopKRouter that "
          "SparseModel cannot patch, and the fused 3-D experts (experts.gate_up_proj / down_proj) are "
          "neither targeted (2-D only) nor patchable")  # fmt: skip
MOE_NAMES = ("MoE: the adapter is keyed by the checkpoint's per-expert 2-D tensors (block_sparse_moe.experts.E.w1, "
             "mlp.experts.E.gate_proj); the loaded model holds fused 3-D experts.gate_up_proj / down_proj: "
             "no name and flat-index mapping")  # fmt: skip
PREFIX_TRAIN = ("the adapter is keyed by the seq-cls model's parameter names (base_model_prefix 'model.' / "
                "'transformer.' / 'bert.'...), its seeded supports drawn under them; the bare base's checkpoint "
                "has no prefix: SparseModel maps no model name to a checkpoint name")  # fmt: skip
PREFIX_ATTACH = ("attach looks the adapter's checkpoint names up in named_parameters() verbatim; over a bare "
                 "base the seq-cls model's names carry its base_model_prefix")  # fmt: skip
DTYPE = ("train loads the base in --dtype bf16 and records the loaded weights' dtype and fingerprints (BF16), "
         "not the checkpoint's (F32 / F16): verify and apply refuse the adapter on its own base")  # fmt: skip
SCALED_EMBEDDING = ("SparseModel._patch replaces an nn.Embedding subclass's forward by a plain F.embedding: "
                    "Gemma2/3's *TextScaledWordEmbedding loses its * embed_scale (forward and gradient change)")  # fmt: skip
CONFIG = ("apply copies the base's config.json unchanged: no num_labels / id2label / label2id / "
          "architectures for the trained head")  # fmt: skip
ALL_LINEAR_HEAD = ("all-linear leaves out only lm_head / score / classifier / pooler (targets._EMBED_OR_HEAD): "
                   "it targets pretraining heads outside base_model (cls.predictions.transform.dense, "
                   "cls.seq_relationship, discriminator_predictions, vocab_transform, head.dense)")  # fmt: skip
NEOX_RENAME = ("GPT-NeoX: transformers renames the checkpoint's embed_out.weight to lm_head.weight on load "
               "(conversion mapping 'GPTNeoXForCausalLM'); the peft-sparta directory is keyed by checkpoint "
               "names, its loader by named_parameters()")  # fmt: skip

# (properties, regex over Item.id, root cause): today's failures; the first matching entry gives the reason.
KNOWN_FAILURES: list[tuple[tuple[str, ...], str, str]] = [
    (("create",), r"^deberta_v2-.*-vo$", "vo's regex knows attention.self.value, not DeBERTa-v2's value_proj"),
    (("create",), r"^distilbert-.*-vo$", "vo's regex knows no DistilBERT attention.v_lin / out_lin"),
    (("create",), r"^modernbert-.*-vo$", "vo's regex knows no ModernBERT fused attn.Wqkv / attn.Wo"),
    (("create",), r"^(bert|deberta_v2|distilbert|modernbert|electra)-task-.*-all-linear$", ALL_LINEAR_HEAD),
    (_TRAINED, _MOE, ROUTER),
    (("train-forward", "train-grad"), r"^gemma[23]-", SCALED_EMBEDDING),
    (("attach", "convert"), _MOE, MOE_NAMES),
    (("attach",), r"^(bert|deberta_v2|distilbert|electra)-task-.*-seq-cls$", ALL_LINEAR_HEAD),
    (("convert",), r"^gpt_neox-", NEOX_RENAME),
]


def known_failure(item: Item) -> str | None:
    for props, pattern, reason in KNOWN_FAILURES:
        if item.prop in props and re.search(pattern, item.id):
            return reason
    return None


def _params(prop: str) -> list:
    out = []
    for item in matrix():
        if item.prop != prop:
            continue
        reason = known_failure(item)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(item, id=item.id, marks=marks))
    return out


# ------------------------------------------------------------------------- shared artifacts


class Store:
    """Checkpoints, adapters and trained models, each built once per session (failures too)."""

    def __init__(self, root: Path):
        self.root = root
        self.memo: dict = {}
        self.data = write_data(root)

    def _once(self, key, build):
        if key not in self.memo:
            try:
                self.memo[key] = (True, build())
            except Exception as e:  # noqa: BLE001 - replayed to every property that needs it
                self.memo[key] = (False, e)
        ok, value = self.memo[key]
        if not ok:
            raise value
        return value

    def base(self, case: Case) -> Path:
        def build():
            path = self.root / case.id / "base"
            case.build(path)
            return path

        return self._once(("base", case.id), build)

    def created(self, case: Case, seed: int) -> Path:
        """A seeded adapter of all linears, the input embedding and the biases inside the blocks, with
        random bf16 values, keyed by checkpoint names."""

        def build():
            targets = ["all-linear", case.family.embeddings, r"\.\d+\..*\.bias$"]
            adapter = create_adapter(open_checkpoint(self.base(case)), DENSITY, seed, targets)
            gen = torch.Generator().manual_seed(seed)
            for d in adapter.deltas.values():
                d.values = (torch.randn(d.count, generator=gen) * 0.02).to(torch.bfloat16)
            path = self.root / case.id / f"created-{seed}.spra"
            adapter.save(path)
            return path

        return self._once(("created", case.id, seed), build)

    def trained(self, case: Case, task: str) -> Path:
        """The adapter `spra_tools.train.loop.train` writes: STEPS steps on CPU, default targets."""

        def build():
            out = self.root / case.id / f"loop-{task}.spra"
            config = TrainConfig(base=str(self.base(case)), data=str(self.data[task]), output=str(out), task=task,
                                 density=DENSITY, steps=STEPS, batch_size=4, max_length=24, lr=1e-2, device="cpu")  # fmt: skip
            train(config, echo=lambda *_: None, progress=False)
            return out

        return self._once(("trained", case.id, task), build)

    def tuned(self, case: Case, task: str) -> dict:
        """A SparseModel trained in-process (all linears + the input embedding; everything transformers
        initializes anew trains densely), with what the properties compare: the wrapped model's first
        logits against the plain model's, its gradients against plain autograd's, and the merged
        model's logits; the adapter is saved with fp32 values (exact)."""
        return self._once(("tuned", case.id, task), lambda: _tune(case, task, self.base(case), self.root / case.id))

    def applied(self, case: Case, adapter: Path) -> Path:
        def build():
            out = adapter.with_suffix(".merged")
            apply_adapter(open_checkpoint(self.base(case)), [(str(adapter), Adapter.load(adapter))], out)
            return out

        return self._once(("applied", str(adapter)), build)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every tensor here is tiny: a second thread only adds synchronisation, which on a shared CPU
    costs far more than the work (a 96x64x128 matmul: 10 ms on two busy threads, 0.2 ms on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Store:
    transformers.utils.logging.set_verbosity_error()  # load reports are read from loading_info instead
    return Store(tmp_path_factory.mktemp("conformance"))


def _load(case: Case, cls: str, path: Path, **kwargs):
    """`cls`.from_pretrained in the case's dtype; (model in eval mode, transformers' loading info)."""
    if cls == case.family.seq_cls:
        kwargs = {"num_labels": len(LABELS), "id2label": ID2LABEL, "label2id": {v: k for k, v in ID2LABEL.items()},
                  **kwargs}  # fmt: skip
    model, info = getattr(transformers, cls).from_pretrained(path, dtype=case.dtype, output_loading_info=True, **kwargs)
    model.config.pad_token_id = PAD
    return model.eval(), info


def _batch(task: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (2, 12), generator=gen)
    labels = torch.randint(0, len(LABELS), (2,), generator=gen) if task == "seq-cls" else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _tune(case: Case, task: str, base: Path, root: Path) -> dict:
    torch.manual_seed(0)
    model, info = _load(case, case.task_class(task), base)
    new = sorted(info["missing_keys"])
    batch = _batch(task)
    with torch.no_grad():
        plain_logits = model(input_ids=batch["input_ids"]).logits
    reference = copy.deepcopy(model)
    sm = SparseModel(model, density=DENSITY, seed=0, targets=("all-linear", case.family.embeddings),
                     dense=[f"^{re.escape(n)}$" for n in new])  # fmt: skip
    with torch.no_grad():
        wrapped_logits = sm(input_ids=batch["input_ids"]).logits
    sm(**batch).loss.backward()
    params = dict(reference.named_parameters())
    reference(**batch).loss.backward()
    grads = {
        name: (delta.grad.detach().clone(), params[name].grad.reshape(-1)[idx].float())
        for name, delta, _, idx, _ in sm.sites()
    }
    opt = SparseAdamW(sm, lr=1e-2)
    for step in range(STEPS):
        if step:
            sm(**_batch(task, step)).loss.backward()
        opt.step()
        opt.zero_grad()
    path = root / f"tuned-{task}.spra"
    labels = {"id2label": {str(k): v for k, v in ID2LABEL.items()}} if task == "seq-cls" else {}
    sm.save(path, values_dtype=torch.float32, task={"type": task, **labels})
    merged = sm.merged().eval()
    with torch.no_grad():
        logits = merged(input_ids=batch["input_ids"]).logits
    return dict(path=path, new=new, plain=plain_logits, wrapped=wrapped_logits, grads=grads, logits=logits,
                ids=batch["input_ids"])  # fmt: skip


def _state(model, skip=()) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n not in skip}


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in got:
        assert torch.equal(bits(got[name]), bits(want[name])), name


def _checkpoint_names(model, names: list[str]) -> set[str]:
    """The checkpoint names transformers writes for these parameters of `model`: its own reverse
    of the load-time conversion (renames, fused experts split per expert)."""
    from transformers.core_model_loading import revert_weight_conversion

    params = dict(model.named_parameters())
    return set(revert_weight_conversion(model, {n: params[n].detach() for n in names}))


# ------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("item", _params("create"))
def test_create(item, store):
    """vo targets exactly the tensors the family's hand-written spec names. all-linear targets every
    linear weight (and every expert) inside the blocks and nothing outside the base model (no
    pretraining or LM head) and no embedding, by transformers' own names for the checkpoint."""
    case = item.case
    base = open_checkpoint(store.base(case))
    chosen = set(create_adapter(base, DENSITY, 7, [item.variant]).deltas)
    if item.variant == "vo":
        spec = {n for n in base.names() if re.search(case.family.vo, n)}
        assert len(spec) == 2 * 2  # two tensors in each of the two layers
        assert chosen == spec
        return
    model, _ = _load(case, case.model_class, store.base(case))
    inside = {id(p) for p in model.base_model.parameters()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    body = [n for n, p in model.named_parameters() if id(p) in inside and id(p) not in embeddings and p.dim() >= 2]
    blocks = [
        f"{m_name}.{p_name}"
        for m_name, module in model.named_modules()
        if re.search(r"\.\d+\.", m_name + ".")
        for p_name, p in module.named_parameters(recurse=False)
        if (p_name == "weight" and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"))
        or type(module).__name__.endswith("Experts")
    ]
    required, allowed = _checkpoint_names(model, blocks), _checkpoint_names(model, body)
    assert required and required <= chosen, sorted(required - chosen)[:5]
    assert chosen <= allowed, sorted(chosen - allowed)[:5]


@pytest.mark.parametrize("item", _params("train"))
def test_train(item, store):
    """`train` runs STEPS steps on CPU and writes an adapter that records them."""
    adapter = Adapter.load(store.trained(item.case, item.variant))
    assert adapter.provenance["steps"] == STEPS and adapter.deltas
    assert adapter.task["type"] == item.variant


@pytest.mark.parametrize("item", _params("train-head"))
def test_train_head(item, store):
    """The new head trains densely and is stored whole: the adapter holds every tensor that
    transformers reports as newly initialized when it loads the seq-cls class over this base."""
    case = item.case
    _, info = _load(case, case.family.seq_cls, store.base(case))
    adapter = Adapter.load(store.trained(case, "seq-cls"))
    assert set(info["missing_keys"]) <= set(adapter.dense), sorted(set(info["missing_keys"]) - set(adapter.dense))
    assert adapter.task.get("id2label") == {str(k): v for k, v in ID2LABEL.items()}


@pytest.mark.parametrize("item", _params("train-verify"))
def test_train_verify(item, store):
    """An adapter trained on this base verifies against it (whatever class trained it)."""
    base = open_checkpoint(store.base(item.case))
    assert verify_adapter(base, Adapter.load(store.trained(item.case, item.variant))) == []


@pytest.mark.parametrize("item", _params("train-forward"))
def test_train_forward(item, store):
    """Wrapping a model in SparseModel (zero deltas) leaves its forward bit for bit as it was."""
    tuned = store.tuned(item.case, item.variant)
    assert torch.equal(bits(tuned["wrapped"]), bits(tuned["plain"]))


@pytest.mark.parametrize("item", _params("train-grad"))
def test_train_grad(item, store):
    """The gradient of every delta equals plain autograd's dense weight gradient at the support, up to
    the rounding of the model's dtype (the reference is rounded to it, down to its subnormal step)."""
    tuned = store.tuned(item.case, item.variant)
    assert tuned["grads"]
    info = torch.finfo(item.case.dtype)
    for name, (sparse, dense) in tuned["grads"].items():
        scale = float(dense.abs().max()) or 1.0
        atol = 2e-3 * scale + 2 * info.smallest_normal * info.eps
        torch.testing.assert_close(sparse, dense, rtol=2e-2, atol=atol, msg=name)


@pytest.mark.parametrize("item", _params("apply"))
def test_apply(item, store):
    """apply(base, trained adapter) is a checkpoint that transformers loads without initializing
    anything anew, and its logits equal the trained model's, bit for bit."""
    case, task = item.case, item.variant
    tuned = store.tuned(case, task)
    model, info = _load(case, case.task_class(task), store.applied(case, tuned["path"]))
    assert not info["missing_keys"], sorted(info["missing_keys"])
    with torch.no_grad():
        logits = model(input_ids=tuned["ids"]).logits
    assert torch.equal(bits(logits), bits(tuned["logits"]))


@pytest.mark.parametrize("item", _params("apply-config"))
def test_apply_config(item, store):
    """The applied checkpoint of a seq-cls adapter loads as the trained classifier with no arguments:
    its labels and architecture come from the checkpoint's config."""
    case = item.case
    merged = store.applied(case, store.tuned(case, "seq-cls")["path"])
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(merged, output_loading_info=True)
    assert not info["missing_keys"], sorted(info["missing_keys"])
    assert model.config.num_labels == len(LABELS) and model.config.id2label == ID2LABEL
    assert model.config.label2id == {v: k for k, v in ID2LABEL.items()}
    assert model.config.architectures == [case.family.seq_cls]


@pytest.mark.parametrize("item", _params("attach"))
def test_attach(item, store):
    """attach on a transformers-loaded model equals transformers loading apply's checkpoint; detach
    restores every parameter bit for bit."""
    case = item.case
    cls = case.model_class if item.variant == "own" else case.family.seq_cls
    path = store.created(case, 1)
    torch.manual_seed(0)
    model, info = _load(case, cls, store.base(case))
    new = set(info["missing_keys"])  # a new head: random, not the adapter's business
    before = _state(model)
    handle = attach(model, path)
    applied, _ = _load(case, cls, store.applied(case, path))
    _assert_same(_state(model, new), _state(applied, new))
    handle.detach()
    _assert_same(_state(model), before)


@pytest.mark.parametrize("item", _params("merge"))
def test_merge(item, store):
    """apply(merge(a, b)) equals W + (a + b) computed here from the checkpoint's tensors, bit for bit."""
    case = item.case
    base = open_checkpoint(store.base(case))
    a, b = (Adapter.load(store.created(case, s)) for s in (1, 2))
    merged, _ = merge_adapters([a, b], base=base)
    path = store.root / case.id / "merged-1-2.spra"
    merged.save(path, overwrite=True)
    out = open_checkpoint(store.applied(case, path))
    for name in base.names():
        w = base.read(name)
        if name in a.deltas:
            flat = torch.zeros(w.numel(), dtype=torch.float32)
            hit = torch.zeros(w.numel(), dtype=torch.bool)
            for d in (a.deltas[name], b.deltas[name]):
                flat[d.indices()] += d.values.float()
                hit[d.indices()] = True
            summed = flat.to(torch.bfloat16).float()  # the merged values are stored in the inputs' bf16
            w = torch.where(hit, (w.reshape(-1).float() + summed).to(w.dtype), w.reshape(-1)).reshape(w.shape)
        assert torch.equal(bits(out.read(name)), bits(w)), name


@pytest.mark.parametrize("item", _params("diff"))
def test_diff(item, store):
    """diff(base, fine-tune) applied to the base gives the fine-tune transformers saved, bit for bit."""
    case = item.case
    root = store.root / case.id
    model, _ = _load(case, case.model_class, store.base(case))
    fine_tune(model, seed=3)
    model.save_pretrained(root / "fine-tune")
    base, tuned = open_checkpoint(store.base(case)), open_checkpoint(root / "fine-tune")
    adapter, _ = diff_checkpoints(base, tuned)
    adapter.save(root / "diff.spra")
    out = open_checkpoint(store.applied(case, root / "diff.spra"))
    assert set(out.names()) == set(tuned.names())
    for name in tuned.names():
        assert torch.equal(bits(out.read(name)), bits(tuned.read(name))), name


@pytest.mark.parametrize("item", _params("export"))
def test_export(item, store, tmp_path):
    """export writes the adapter byte for byte, an adapter_config.json that describes it, and a card."""
    path = store.created(item.case, 1)
    out = export_adapter(path, tmp_path / "export")
    assert (out / path.name).read_bytes() == path.read_bytes()
    config = json.loads((out / "adapter_config.json").read_text())
    adapter = Adapter.load(path)
    assert config["num_values"] == adapter.num_values and config["adapter_file"] == path.name
    assert (out / "README.md").read_text().startswith("---\n")


class _LoadAs:
    """transformers.AutoModelForCausalLM inside peft_sparta.loader, in the case's dtype (the loader
    hard-codes bf16)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def from_pretrained(self, path, **kwargs):
        kwargs.pop("torch_dtype", None)
        return transformers.AutoModelForCausalLM.from_pretrained(path, **{**kwargs, "dtype": self.dtype})


@pytest.mark.parametrize("item", _params("convert"))
def test_convert(item, store, tmp_path, monkeypatch):
    """convert to peft-sparta: its own loader (SpaRTAforCausalLM) builds the model that transformers
    loads from apply's checkpoint, and reading the directory back gives the same adapter."""
    peft_sparta = pytest.importorskip("peft_sparta")
    case = item.case
    path = store.created(case, 1)
    adapter = Adapter.load(path)
    write_peft_sparta(adapter, tmp_path / "ps", str(store.base(case)))
    monkeypatch.setattr(peft_sparta.loader, "AutoModelForCausalLM", _LoadAs(case.dtype))
    loaded = peft_sparta.SpaRTAforCausalLM(str(tmp_path / "ps")).base_model
    applied, _ = _load(case, case.family.task, store.applied(case, path))
    _assert_same(_state(loaded), _state(applied))
    back = read_peft_sparta(tmp_path / "ps", open_checkpoint(store.base(case)))
    assert back.deltas.keys() == adapter.deltas.keys()
    for name, d in adapter.deltas.items():
        assert torch.equal(back.deltas[name].indices(), d.indices()), name
        assert torch.equal(back.deltas[name].values, d.values.float()), name
