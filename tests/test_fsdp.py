"""`spra-tools train --fsdp`: the base sharded by FSDP2 over two gloo processes (spawned here) trains
the adapter one process trains on the same global batch, writes an ordinary .spra that `apply` and
transformers take, and resumes bit-exactly; world size 1 on a GPU trains what the unsharded loop
does, and two GPUs (NCCL) what one does."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import transformers
from safetensors.torch import load_file

from spra_tools.adapter import Adapter
from spra_tools.checkpoint import open_checkpoint
from spra_tools.errors import SpraError
from spra_tools.surgery import apply_adapter
from spra_tools.testing import CORPUS, build_tiny_model, build_word_tokenizer
from spra_tools.train import SparseModel, checkpoints
from spra_tools.train.config import TrainConfig
from spra_tools.train.loop import train

WORLD = 2
STEPS, INTERRUPT_AT = 4, 2
# The same global batch in one process and in two: FSDP2 sums the two halves' support gradients
# (each a mean over its tokens, halved before the sum) where one process takes the mean over all
# tokens at once; the fp32 sums are reordered, so the deltas agree to fp32 rounding carried through
# AdamW's normalisation (~1e-5 relative at these magnitudes, far below the 1e-3 step size).
TOLERANCE = dict(rtol=1e-3, atol=2e-5)


def _settings(root, out, **kw) -> dict:
    settings = dict(base=str(root / "base"), data=str(root / "corpus.jsonl"), output=str(out), steps=STEPS,
                    eval_data=str(root / "corpus.jsonl"), eval_every=INTERRUPT_AT,
                    lr=1e-3, density=0.05, seed=3, batch_size=4, grad_accum=2, dtype="fp32", values_dtype="fp32",
                    targets=("all-linear", r"lm_head\.weight$"), device="cpu", max_grad_norm=1.0)  # fmt: skip
    settings.update(kw)
    return settings


def _interrupt_at(step: int):
    def on_step(done: int) -> None:
        if done == step:
            raise KeyboardInterrupt

    return on_step


def _worker(rank: int, root, ports: list[int]) -> None:
    """One rank of the three FSDP2 runs: uninterrupted; interrupted after INTERRUPT_AT; resumed. With
    activation checkpointing, which recomputes each layer (and its all-gather) in backward."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1")
    runs = [
        (dict(output=str(root / "fsdp.spra"), checkpoint_dir=str(root / "ck_full")), None),
        (dict(output=str(root / "resumed.spra"), checkpoint_dir=str(root / "ck_cut")), _interrupt_at(INTERRUPT_AT)),
        (dict(output=str(root / "resumed.spra"), checkpoint_dir=str(root / "ck_cut"), resume=True), None),
        (dict(CLS, output=str(root / "cls_fsdp.spra"), data=str(root / CLS["data"])), None),
    ]
    for port, (kw, on_step) in zip(ports, runs):
        os.environ["MASTER_PORT"] = str(port)
        settings = _settings(root, kw.pop("output"), batch_size=4 // WORLD, fsdp=True, gradient_checkpointing=True)
        config = TrainConfig.from_dict({**settings, **kw})
        try:
            train(config, echo=lambda *_: None, progress=False, on_step=on_step)
        except SpraError:
            assert on_step is not None  # the interruption, its checkpoint written
        if on_step is not None and rank == 0:
            checkpoints_seen = sorted(p.name for p in (root / "ck_cut").glob("step-*"))
            (root / "cut.json").write_text(json.dumps(checkpoints_seen))


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _make_base(root, dtype) -> None:
    """A tiny Llama with a word-level tokenizer, and its corpus."""
    build_tiny_model("llama", root / "base", dtype, hidden=64, layers=2)
    build_word_tokenizer(CORPUS.split(), root / "base")
    words = CORPUS.split()
    lines = [" ".join(words[i : i + 16]) for i in range(0, len(words) - 16, 4)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    # Three labels: the new head's 3 rows split 2 + 1 over two ranks, an uneven (padded) shard.
    texts = [" ".join(words[(5 * i + j) % len(words)] for j in range(6)) for i in range(24)]
    rows = [{"text": t, "label": "abc"[i % 3]} for i, t in enumerate(texts)]
    (root / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# A new classification head (trained densely, stored whole) under FSDP2.
CLS = dict(task="seq-cls", data="cls.jsonl", eval_data=None, eval_every=None, grad_accum=1)


def _cls_settings(root, out, **kw) -> dict:
    return _settings(root, out, **{**CLS, "data": str(root / CLS["data"]), **kw})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny base, one process's run (batch 4) and the three FSDP2 runs (2 processes x batch 2)."""
    root = tmp_path_factory.mktemp("fsdp")
    _make_base(root, torch.float32)
    one = TrainConfig.from_dict(_settings(root, root / "one.spra", checkpoint_dir=str(root / "ck_one")))
    train(one, echo=lambda *_: None, progress=False)
    train(TrainConfig.from_dict(_cls_settings(root, root / "cls_one.spra")), echo=lambda *_: None, progress=False)
    mp.spawn(_worker, args=(root, _free_ports(4)), nprocs=WORLD)
    return root


def test_fsdp_trains_the_adapter_of_one_process(runs):
    one, two = Adapter.load(runs / "one.spra"), Adapter.load(runs / "fsdp.spra")
    assert set(two.deltas) == set(one.deltas) and len(one.deltas) == 2 * 7 + 1
    assert two.provenance["steps"] == STEPS and two.provenance["tokens"] == one.provenance["tokens"]
    for kind in ("baseline_eval", "best_eval"):  # every rank evaluates the whole eval set through FSDP2
        assert two.provenance[kind]["loss"] == pytest.approx(one.provenance[kind]["loss"], rel=1e-4)
    for name, delta in one.deltas.items():
        other = two.deltas[name]
        assert other.support == delta.support and other.shape == delta.shape and other.fingerprint == delta.fingerprint
        assert delta.values.abs().sum() > 0
        torch.testing.assert_close(other.values, delta.values, **TOLERANCE, msg=name)


def test_fsdp_trains_a_new_classification_head_as_one_process(runs):
    one, two = Adapter.load(runs / "cls_one.spra"), Adapter.load(runs / "cls_fsdp.spra")
    assert set(two.dense) == set(one.dense) == {"score.weight"} and set(two.deltas) == set(one.deltas)
    head = one.dense["score.weight"]
    assert head.shape == (3, 64) and two.task == one.task
    torch.testing.assert_close(two.dense["score.weight"], head, **TOLERANCE)
    for name, delta in one.deltas.items():
        torch.testing.assert_close(two.deltas[name].values, delta.values, **TOLERANCE, msg=name)


def test_fsdp_writes_the_file_one_process_writes_from_the_same_deltas(runs, tmp_path):
    trained = Adapter.load(runs / "fsdp.spra")
    model = transformers.AutoModelForCausalLM.from_pretrained(runs / "base", dtype=torch.float32)
    sm = SparseModel(model, adapter=trained)
    sm.save(tmp_path / "again.spra", torch.float32, provenance=trained.provenance, task=trained.task)
    assert (tmp_path / "again.spra").read_bytes() == (runs / "fsdp.spra").read_bytes()


def test_fsdp_checkpoint_is_the_one_of_one_process(runs):
    """Rank 0 writes the whole run: every tensor the single-process checkpoint has, at its size."""
    one = load_file(str(runs / "ck_one" / checkpoints.LAST / checkpoints.TENSORS))
    two = load_file(str(runs / "ck_full" / checkpoints.LAST / checkpoints.TENSORS))
    assert set(two) == set(one)
    for key, tensor in one.items():
        torch.testing.assert_close(two[key], tensor, rtol=1e-3, atol=1e-6 if "sq" in key else 2e-5, msg=key)
    state = json.loads((runs / "ck_full" / checkpoints.LAST / checkpoints.STATE).read_text())
    assert set(state["optimizer_steps"].values()) == {STEPS}


def test_fsdp_resume_is_bit_exact(runs):
    assert json.loads((runs / "cut.json").read_text())[0].startswith(f"step-{INTERRUPT_AT:08d}-")
    full, resumed = Adapter.load(runs / "fsdp.spra"), Adapter.load(runs / "resumed.spra")
    assert resumed.provenance["steps"] == STEPS
    for name, delta in full.deltas.items():
        assert torch.equal(resumed.deltas[name].values, delta.values), name


def test_fsdp_adapter_applies_and_loads_in_transformers(runs, tmp_path, call_cli):
    for name in ("one", "fsdp"):
        result = call_cli("apply", str(runs / "base"), str(runs / f"{name}.spra"), "-o", str(tmp_path / name))
        assert result.rc == 0, result.stderr
    ids = torch.tensor([[3, 7, 11, 5, 9, 2, 4, 8]])
    logits = {}
    for name in ("base", "one", "fsdp"):
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name if name != "base" else runs / name)
        with torch.no_grad():
            logits[name] = model(input_ids=ids).logits
    assert not torch.allclose(logits["fsdp"], logits["base"], atol=1e-3)
    torch.testing.assert_close(logits["fsdp"], logits["one"], rtol=1e-3, atol=1e-4)


def test_fsdp_in_one_process_trains_the_unsharded_adapter_bit_for_bit(tmp_path):
    """--fsdp without torchrun: a group of one, whose shards are the whole weights and whose
    reductions add nothing, so every value is the plain loop's."""
    _make_base(tmp_path, torch.float32)
    for name, kw in (("plain", {}), ("fsdp", dict(fsdp=True))):
        settings = _settings(tmp_path, tmp_path / f"{name}.spra", eval_data=None, eval_every=None, steps=2, **kw)
        train(TrainConfig.from_dict(settings), echo=lambda *_: None, progress=False)
    plain = Adapter.load(tmp_path / "plain.spra")
    assert all(d.values.abs().sum() > 0 for d in plain.deltas.values())
    assert (tmp_path / "fsdp.spra").read_bytes() == (tmp_path / "plain.spra").read_bytes()
    assert not torch.distributed.is_initialized()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp_world_size_one_on_gpu_trains_the_unsharded_adapter(tmp_path):
    """FSDP2 over one GPU (bf16 base): the adapter, the checkpoint and a bit-exact resume."""
    _make_base(tmp_path, torch.bfloat16)
    common = dict(device="cuda", dtype="bf16")
    for name, kw in (("plain", {}), ("fsdp", dict(fsdp=True))):
        train(TrainConfig.from_dict(_settings(tmp_path, tmp_path / f"{name}.spra", **common, **kw)), progress=False)
    cut = _settings(tmp_path, tmp_path / "resumed.spra", checkpoint_dir=str(tmp_path / "ck"), fsdp=True, **common)
    with pytest.raises(SpraError):
        train(TrainConfig.from_dict(cut), progress=False, on_step=_interrupt_at(INTERRUPT_AT))
    train(TrainConfig.from_dict({**cut, "resume": True}), progress=False)
    plain, fsdp = Adapter.load(tmp_path / "plain.spra"), Adapter.load(tmp_path / "fsdp.spra")
    resumed = Adapter.load(tmp_path / "resumed.spra")
    for name, delta in plain.deltas.items():
        assert delta.values.abs().sum() > 0
        torch.testing.assert_close(fsdp.deltas[name].values, delta.values, **TOLERANCE, msg=name)
        assert torch.equal(resumed.deltas[name].values, fsdp.deltas[name].values), name
    base = open_checkpoint(tmp_path / "base")
    apply_adapter(base, [("fsdp", fsdp)], tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)
    name = next(iter(fsdp.deltas))
    weight = merged.get_parameter(name).detach().reshape(-1)
    original = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    idx = torch.from_numpy(fsdp.deltas[name].support.indices())
    assert not torch.equal(weight[idx], original.get_parameter(name).detach().reshape(-1)[idx])


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_fsdp_on_two_gpus_trains_the_adapter_of_one(tmp_path):
    """torchrun --nproc-per-node 2 --fsdp over NCCL (batch 2 each) = one GPU, batch 4."""
    import subprocess
    import sys

    from conftest import _clean_env

    _make_base(tmp_path, torch.float32)
    args = ["train", tmp_path / "base", "--data", tmp_path / "corpus.jsonl", "--steps", "4", "--lr", "1e-3",
            "--density", "0.05", "--device", "cuda", "--dtype", "fp32", "--values-dtype", "fp32", "--seed", "3"]  # fmt: skip
    env = _clean_env({"OMP_NUM_THREADS": "1"})
    one = subprocess.run([sys.executable, "-m", "spra_tools", *map(str, args), "--batch-size", "4",
                          "-o", tmp_path / "one.spra"], capture_output=True, text=True, env=env)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "spra_tools", *map(str, args), "--batch-size", "2", "--fsdp",
                          "-o", tmp_path / "two.spra"], capture_output=True, text=True, env=env)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = Adapter.load(tmp_path / "one.spra"), Adapter.load(tmp_path / "two.spra")
    assert b.provenance["tokens"] == a.provenance["tokens"]
    for name, delta in a.deltas.items():
        assert delta.values.abs().sum() > 0
        torch.testing.assert_close(b.deltas[name].values, delta.values, **TOLERANCE, msg=name)
