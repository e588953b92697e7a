"""The training loop sends right-padded causal-LM batches without their attention mask (so that
transformers runs causal attention instead of a masked kernel): for every decoder family, the loss
and every weight gradient must be those of the masked batch."""

from __future__ import annotations

import pytest
import torch
import transformers
from families import FAMILIES

from spra_tools.train.data.batches import collate
from spra_tools.train.data.tokenizing import IGNORE, TokenizedData

DECODERS = [f for f in FAMILIES if f.decoder]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", DECODERS, ids=[f.name for f in DECODERS])
def test_right_padded_batches_need_no_mask(family):
    config = getattr(transformers, family.config)(**family.settings)
    torch.manual_seed(0)
    model = getattr(transformers, family.task)(config).float().eval()  # eval: no dropout
    gen = torch.Generator().manual_seed(1)
    vocab = config.vocab_size
    rows = [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in (23, 9, 16, 2)]
    labels = [list(r) for r in rows]
    labels[1][:4] = [IGNORE] * 4  # a prompt without loss, as prompt/completion records have
    data = TokenizedData(rows, labels, None, len(rows), 0, sum(map(len, rows)), 0)
    batch = collate(data, range(len(rows)), pad_id=0, task="causal-lm", pad_to=8)
    assert batch["input_ids"].shape[1] == 24 and bool((batch["attention_mask"] == 0).any())

    def loss_and_grads(b):
        model.zero_grad(set_to_none=True)
        loss = model(**b).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    masked, masked_grads = loss_and_grads(batch)
    free, free_grads = loss_and_grads({k: v for k, v in batch.items() if k != "attention_mask"})
    torch.testing.assert_close(free, masked, rtol=1e-5, atol=1e-6)
    assert masked_grads.keys() == free_grads.keys()
    for name, g in masked_grads.items():
        torch.testing.assert_close(free_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
