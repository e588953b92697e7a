"""spra_tools.names against transformers' own loader: every parameter of a model that transformers
loaded from a checkpoint holds, bit for bit, the checkpoint tensor that `NameMap` names for it, and
the parameters it calls new are exactly those transformers reports as newly initialized — for a
task class over a bare base, a bare class over a task checkpoint, renames on load and tied weights."""

from __future__ import annotations

import pytest
import torch
import transformers
from families import CASES

from spra_tools.checkpoint import open_checkpoint
from spra_tools.dtypes import bit_view
from spra_tools.names import NameMap

# (case id, class that loads it): the prefix both ways, a rename on load, tied weights
PAIRS = [
    ("bert-bare-fp16", "BertForSequenceClassification"),  # bert. added; a new classifier
    ("roberta-task-fp16", "RobertaModel"),  # roberta. stripped; the LM head left out
    ("llama-task-bf16-sharded", "LlamaModel"),
    ("qwen2-bare-bf16-sharded", "Qwen2ForSequenceClassification"),
    ("gpt_neox-task-fp32", "GPTNeoXForCausalLM"),  # embed_out -> lm_head on load
    ("gpt2-task-bf16-sharded", "GPT2LMHeadModel"),  # lm_head tied to wte, stored once
    ("gemma2-task-fp32", "Gemma2ForSequenceClassification"),
]
BY_ID = {c.id: c for c in CASES}


@pytest.mark.parametrize("case_id,cls", PAIRS)
def test_names_follow_transformers(case_id, cls, tmp_path):
    case = BY_ID[case_id]
    case.build(tmp_path)
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    model, info = getattr(transformers, cls).from_pretrained(tmp_path, dtype=case.dtype, output_loading_info=True)
    ckpt = open_checkpoint(tmp_path)
    names = NameMap(model, ckpt.names())
    params = dict(model.named_parameters(remove_duplicate=False))
    new = {n for n in params if names.is_new(n)}
    assert new == set(info["missing_keys"])
    for name, p in params.items():
        if name in new:
            assert names.checkpoint_name(name) == name
            continue
        stored = ckpt.read(names.checkpoint_name(name))
        assert torch.equal(bit_view(stored), bit_view(p.detach())), name
        assert names.model_name(names.checkpoint_name(name)) in params


def test_names_without_checkpoint_are_the_saved_names(tmp_path):
    """A model built from its config maps to the names its save_pretrained writes (renames reversed)."""
    case = BY_ID["gpt_neox-task-fp32"]
    model = case.build(tmp_path)
    names = NameMap(model)
    assert {names.checkpoint_name(n) for n, _ in model.named_parameters()} == set(open_checkpoint(tmp_path).names())
