"""diff -> apply reproduces a fine-tuned checkpoint bit-exactly; create/apply/restore leave the base exact.

One table of checkpoints (architecture x dtype x layout) feeds every property; the reference for
"fine-tuned" is a real transformers model saved with save_pretrained, and the merged output is
judged by transformers loading it.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from spra_tools import ops
from spra_tools.adapter import Adapter
from spra_tools.algebra import diff_checkpoints
from spra_tools.checkpoint import INDEX, open_checkpoint
from spra_tools.dtypes import DTYPE_NAMES, bit_view
from spra_tools.surgery import apply_adapter, create_adapter, verify_adapter
from spra_tools.testing import build_tiny_model, fine_tune

CASES = [
    (arch, dtype, shard)
    for arch in ("llama", "qwen2", "gemma", "gpt2")
    for dtype, shard in ((torch.bfloat16, "60KB"), (torch.float32, None))
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-{'sharded' if c[2] else 'single'}")
def pair(request, tmp_path_factory):
    arch, dtype, shard = request.param
    root = tmp_path_factory.mktemp(f"{arch}")
    model = build_tiny_model(arch, root / "base", dtype, shard)
    fine_tune(model, seed=1)
    model.save_pretrained(root / "tuned", **({"max_shard_size": shard} if shard else {}))
    return root, dtype, shard


def test_diff_apply_reproduces_tuned_bit_exactly(pair):
    root, dtype, shard = pair
    base, tuned = open_checkpoint(root / "base"), open_checkpoint(root / "tuned")
    if shard:
        assert len(base.shards) > 1, "fixture should be sharded"
    adapter, report = diff_checkpoints(base, tuned)
    assert adapter.exact and adapter.num_values > 0
    adapter.save(root / "d.spra", overwrite=True)
    loaded = Adapter.load(root / "d.spra")
    assert verify_adapter(base, loaded) == []
    apply_adapter(base, [("d.spra", loaded)], root / "out", overwrite=True)
    out = open_checkpoint(root / "out")
    assert out.names() == tuned.names()
    for name in tuned.names():
        assert torch.equal(bit_view(out.read(name)), bit_view(tuned.read(name))), name
    # Same shard names and index layout as the input; side files copied.
    assert [p.name for p in (root / "out").glob("*.safetensors")] == [
        p.name for p in (root / "base").glob("*.safetensors")
    ]
    assert (root / "out" / "config.json").read_text() == (root / "base" / "config.json").read_text()
    if shard:
        index = json.loads((root / "out" / INDEX).read_text())
        assert index["weight_map"] == json.loads((root / "base" / INDEX).read_text())["weight_map"]


def test_merged_checkpoint_is_the_tuned_model_for_transformers(pair):
    root, _, _ = pair
    base, tuned = open_checkpoint(root / "base"), open_checkpoint(root / "tuned")
    adapter, _ = diff_checkpoints(base, tuned)
    apply_adapter(base, [("mem", adapter)], root / "out2", overwrite=True)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = []
    for d in ("out2", "tuned"):
        m = transformers.AutoModelForCausalLM.from_pretrained(root / d, dtype=torch.float32)
        with torch.no_grad():
            logits.append(m(ids).logits)
    assert torch.equal(logits[0], logits[1])


def test_zero_adapter_and_restore_leave_base_exact(pair):
    root, _, _ = pair
    base = open_checkpoint(root / "base")
    adapter = create_adapter(base, density=0.2, seed=3, targets=["all-linear"])
    apply_adapter(base, [("zero", adapter)], root / "zero", overwrite=True)
    same = open_checkpoint(root / "zero")
    for name in base.names():
        assert torch.equal(bit_view(same.read(name)), bit_view(base.read(name))), name
    # Random values applied and then restored from the gathered originals: the base bit for bit.
    gen = torch.Generator().manual_seed(5)
    for name, d in adapter.deltas.items():
        w = base.read(name)
        idx = d.indices()
        original = ops.gather(w, idx)
        ops.scatter_apply(w, idx, torch.randn(d.count, generator=gen).to(torch.bfloat16), scale=0.7)
        assert not torch.equal(bit_view(w), bit_view(base.read(name)))
        ops.restore(w, idx, original)
        assert torch.equal(bit_view(w), bit_view(base.read(name))), name


def test_density_diff_keeps_largest_changes(pair):
    root, _, _ = pair
    base, tuned = open_checkpoint(root / "base"), open_checkpoint(root / "tuned")
    adapter, report = diff_checkpoints(base, tuned, density=0.01)
    assert not adapter.exact and 0.0 < report["retained"] < 1.0
    for name, d in adapter.deltas.items():
        w, t = base.read(name).reshape(-1).float(), tuned.read(name).reshape(-1).float()
        delta = (t - w).abs()
        assert d.count == min(int(0.01 * w.numel()), int((delta > 0).sum()))
        kept = delta[d.indices()]
        dropped = delta.clone()
        dropped[d.indices()] = -1
        assert kept.min() >= dropped.max(), name  # nothing larger was left out


def test_apply_to_tensors_not_aligned_for_their_dtype(tmp_path):
    """A hand-made single-file base whose float tensors start at odd offsets (legal safetensors)."""
    import numpy as np

    from spra_tools import format as fmt

    gen = torch.Generator().manual_seed(9)
    tensors = {
        "odd": torch.randint(0, 255, (3,), dtype=torch.uint8, generator=gen),
        "a.weight": torch.randn(40, 24, generator=gen).to(torch.bfloat16),
        "b.weight": torch.randn(17, 9, generator=gen),
    }
    with open(tmp_path / "base.safetensors", "wb") as f:
        fmt.write_container(
            f,
            [(n, DTYPE_NAMES[t.dtype], bit_view(t).numpy()) for n, t in tensors.items()],
            None,
        )
    base = open_checkpoint(tmp_path / "base.safetensors")
    assert base.info("a.weight").begin % 2 and base.info("b.weight").begin % 4
    adapter = create_adapter(base, density=0.3, seed=4, targets=["all"])
    for d in adapter.deltas.values():
        d.values = torch.randn(d.count, generator=gen).to(torch.bfloat16)
    apply_adapter(base, [("mem", adapter)], tmp_path / "out.safetensors")
    out = open_checkpoint(tmp_path / "out.safetensors")
    assert torch.equal(out.read("odd"), tensors["odd"])
    for name, d in adapter.deltas.items():
        expected = tensors[name].clone()
        ops.scatter_apply(expected, d.indices(), d.values)
        assert torch.equal(bit_view(out.read(name)), bit_view(expected)), name
        assert not np.array_equal(bit_view(expected).numpy(), bit_view(tensors[name]).numpy())
