"""`spra-tools train` end to end on a tiny local Llama with a word-level tokenizer: the loss falls
(judged by transformers on the applied checkpoint), an interrupted run resumes to a byte-identical
adapter, classification learns a separable task, every record shape trains, bad input fails in one
line; and SparseModel + SparseAdamW inside transformers.Trainer."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import transformers

from spra_tools.adapter import Adapter
from spra_tools.checkpoint import open_checkpoint
from spra_tools.dtypes import bit_view
from spra_tools.errors import SpraError
from spra_tools.live import load_model
from spra_tools.surgery import apply_adapter
from spra_tools.testing import CORPUS, build_tiny_model, build_word_tokenizer
from spra_tools.train import SparseAdamW, SparseModel, checkpoints, loop
from spra_tools.train.config import TrainConfig
from spra_tools.train.data import tokenize
from spra_tools.train.loop import train
from spra_tools.train.monitor import read_log

WORDS = CORPUS.split()
EXTRA = ["good", "great", "fine", "bad", "awful", "poor", "movie", "positive", "negative", "question", "answer"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    build_tiny_model("llama", root / "base", torch.bfloat16, hidden=128, layers=2)
    build_word_tokenizer(WORDS + EXTRA, root / "base")
    lines = [" ".join(WORDS[i : i + 16]) for i in range(0, len(WORDS) - 16, 4)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    rng = random.Random(0)
    for split, n in (("train", 96), ("eval", 32)):
        rows = []
        for _ in range(n):
            label = rng.choice(["positive", "negative"])
            cue = rng.choice(["good", "great", "fine"] if label == "positive" else ["bad", "awful", "poor"])
            filler = [rng.choice(WORDS) for _ in range(6)]
            filler.insert(rng.randrange(7), cue)
            rows.append(json.dumps({"text": " ".join(filler), "label": label}) + "\n")
        (root / f"cls_{split}.jsonl").write_text("".join(rows))
    return root


def _config(workdir, out, **kw) -> TrainConfig:
    settings = dict(base=str(workdir / "base"), data=str(workdir / "corpus.jsonl"), output=str(out), steps=40,
                    lr=1e-2, density=0.05, batch_size=8, targets=("all-linear", r"lm_head\.weight$"),
                    schedule="constant", max_grad_norm=None, device="cpu")  # fmt: skip
    settings.update(kw)
    return TrainConfig.from_dict(settings)


def _corpus_loss(model_dir, workdir) -> float:
    tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    losses = []
    with torch.no_grad():
        for line in (workdir / "corpus.jsonl").read_text().splitlines():
            ids = torch.tensor([tokenizer(json.loads(line)["text"])["input_ids"]])
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    return sum(losses) / len(losses)


def test_cli_training_lowers_the_loss_judged_by_transformers(workdir, tmp_path, call_cli):
    rc, out, err = call_cli("train", workdir / "base", "--data", workdir / "corpus.jsonl", "-o", tmp_path / "a.spra",
                            "--steps", "40", "--lr", "1e-2", "--density", "0.05", "--targets", "all-linear",
                            "--targets", r"lm_head\.weight$", "--schedule", "constant", "--device", "cpu",
                            "--log-dir", tmp_path / "logs")  # fmt: skip
    assert rc == 0, err
    assert "steps:" in out and "40" in out
    adapter = Adapter.load(tmp_path / "a.spra")
    assert adapter.provenance["steps"] == 40 and adapter.provenance["config"]["lr"] == 1e-2
    numel = open_checkpoint(workdir / "base").numel
    assert adapter.base == {"name": str(workdir / "base"), "revision": None, "numel": numel}
    rc, out, _ = call_cli("info", tmp_path / "a.spra", "--json")
    assert rc == 0 and json.loads(out)["fraction_of_model"] == adapter.num_values / numel
    apply_adapter(open_checkpoint(workdir / "base"), [("a", adapter)], tmp_path / "merged")
    base_loss, tuned_loss = _corpus_loss(workdir / "base", workdir), _corpus_loss(tmp_path / "merged", workdir)
    assert tuned_loss < 0.6 * base_loss, (base_loss, tuned_loss)
    lines = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "train"] == list(range(1, 41))
    assert (tmp_path / "logs" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_interrupted_run_resumes_to_a_byte_identical_adapter(workdir, tmp_path):
    common = dict(grad_accum=2, batch_size=4, eval_data=str(workdir / "corpus.jsonl"), eval_every=10,
                  schedule="cosine", warmup=0.1, max_grad_norm=1.0, weight_decay=0.01)  # fmt: skip
    train(_config(workdir, tmp_path / "full.spra", checkpoint_dir=str(tmp_path / "ck1"), **common), progress=False)

    def interrupt(step):
        if step == 20:
            raise KeyboardInterrupt

    resumable = _config(workdir, tmp_path / "resumed.spra", checkpoint_dir=str(tmp_path / "ck2"), **common)
    with pytest.raises(SpraError, match="interrupted after step 20"):
        train(resumable, progress=False, on_step=interrupt)
    assert not (tmp_path / "resumed.spra").exists()
    train(_config(workdir, tmp_path / "resumed.spra", checkpoint_dir=str(tmp_path / "ck2"), resume=True, **common),
          progress=False)  # fmt: skip
    assert (tmp_path / "resumed.spra").read_bytes() == (tmp_path / "full.spra").read_bytes()

    changed = _config(workdir, tmp_path / "x.spra", checkpoint_dir=str(tmp_path / "ck2"), resume=True,
                      **{**common, "lr": 5e-3})  # fmt: skip
    with pytest.raises(SpraError, match="different settings.*lr"):
        train(changed, progress=False)


def test_the_base_is_evaluated_before_the_first_step(workdir, tmp_path, call_cli):
    rc, out, err = call_cli("train", workdir / "base", "--data", workdir / "corpus.jsonl", "--eval-data",
                            workdir / "corpus.jsonl", "--eval-every", "1", "--steps", "2", "--lr", "1e-2",
                            "--dtype", "fp32", "--device", "cpu", "--log-dir", tmp_path / "logs",
                            "-o", tmp_path / "a.spra")  # fmt: skip
    assert rc == 0, err
    evals = [x for x in read_log(tmp_path / "logs" / "metrics.jsonl") if x["split"] == "eval"]
    assert [x["step"] for x in evals] == [0, 1, 2]
    # The reference: transformers' own loss of the untouched base on each example, token-weighted.
    tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "base", dtype=torch.float32)
    data = tokenize(workdir / "corpus.jsonl", tokenizer, "causal-lm", 512)
    total = weight = 0.0
    with torch.no_grad():
        for ids, labels in zip(data.input_ids, data.labels):
            n = sum(t != -100 for t in labels[1:])
            total += model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item() * n
            weight += n
    assert evals[0]["loss"] == pytest.approx(total / weight, rel=1e-5)
    assert f"step 0: eval (baseline) loss {evals[0]['loss']:.4g}" in out
    provenance = Adapter.load(tmp_path / "a.spra").provenance
    assert provenance["baseline_eval"]["loss"] == evals[0]["loss"]
    assert provenance["best_eval"]["step"] in (1, 2)  # the baseline is not a trained adapter


def test_a_resumed_run_keeps_the_best_evaluation_of_before_the_interruption(workdir, tmp_path):
    # A rate far too high: the evaluation at step 4 is worse than step 2's, whose adapter is kept.
    common = dict(lr=3.0, steps=4, eval_data=str(workdir / "corpus.jsonl"), eval_every=2)
    full = train(_config(workdir, tmp_path / "full.spra", **common), progress=False)
    assert full["best_eval"]["step"] == 2

    def interrupt(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(SpraError, match="interrupted after step 2"):
        train(_config(workdir, tmp_path / "r.spra", checkpoint_dir=str(tmp_path / "ck"), **common), progress=False,
              on_step=interrupt)  # fmt: skip
    resumed = train(_config(workdir, tmp_path / "r.spra", checkpoint_dir=str(tmp_path / "ck"), resume=True, **common),
                    progress=False)  # fmt: skip
    assert resumed["best_eval"] == full["best_eval"]
    assert (tmp_path / "r.spra").read_bytes() == (tmp_path / "full.spra").read_bytes()


def test_gradient_checkpointing_trains_the_same_adapter(workdir, tmp_path):
    for flag in (False, True):
        config = _config(workdir, tmp_path / f"{flag}.spra", steps=3, gradient_checkpointing=flag, dtype="fp32")
        train(config, progress=False)
    plain, checkpointed = Adapter.load(tmp_path / "False.spra"), Adapter.load(tmp_path / "True.spra")
    assert checkpointed.provenance["config"]["gradient_checkpointing"] is True
    for name, delta in plain.deltas.items():  # recomputation changes nothing: the same values, bit for bit
        assert delta.values.abs().sum() > 0
        assert torch.equal(bit_view(checkpointed.deltas[name].values), bit_view(delta.values))


def test_fp16_values_are_the_trained_deltas_rounded_to_fp16(workdir, tmp_path):
    for dtype in ("fp32", "fp16"):
        train(_config(workdir, tmp_path / f"{dtype}.spra", steps=3, values_dtype=dtype), progress=False)
    exact, half = Adapter.load(tmp_path / "fp32.spra"), Adapter.load(tmp_path / "fp16.spra")
    assert exact.exact and not half.exact
    for name, delta in exact.deltas.items():  # fp32 values are the master deltas, bit for bit
        assert delta.values.dtype == torch.float32 and delta.values.abs().sum() > 0
        assert half.deltas[name].values.dtype == torch.float16
        assert torch.equal(half.deltas[name].values.view(torch.int16), delta.values.half().view(torch.int16))


def test_any_64_bit_seed_trains(workdir, tmp_path):
    for seed in (20_000_000_000_000, 2**64 - 1):
        train(_config(workdir, tmp_path / f"{seed}.spra", steps=2, seed=seed), progress=False)
        adapter = Adapter.load(tmp_path / f"{seed}.spra")
        assert adapter.provenance["config"]["seed"] == seed and adapter.num_values > 0


def test_sequence_classification_learns_a_separable_task(workdir, tmp_path):
    config = _config(workdir, tmp_path / "cls.spra", task="seq-cls", data=str(workdir / "cls_train.jsonl"),
                     eval_data=str(workdir / "cls_eval.jsonl"), targets=("all-linear",), steps=60, lr=5e-3,
                     density=0.1, eval_every=20)  # fmt: skip
    summary = train(config, progress=False)
    assert summary["best_eval"]["value"] is not None
    adapter = Adapter.load(tmp_path / "cls.spra")
    assert adapter.task["type"] == "seq-cls" and set(adapter.task["id2label"].values()) == {"positive", "negative"}
    assert "score.weight" in adapter.dense
    assert adapter.provenance["best_eval"]["accuracy"] >= 0.9
    # The adapter on a freshly loaded classifier (random head replaced by the trained one) agrees.
    model = load_model(workdir / "base", tmp_path / "cls.spra", dtype=torch.bfloat16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "base")
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = [json.loads(x) for x in (workdir / "cls_eval.jsonl").read_text().splitlines()]
    correct = 0
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.tensor([tokenizer(row["text"])["input_ids"]])).logits
            correct += model.config.id2label[int(logits.argmax())] == row["label"]
    assert correct / len(rows) >= 0.9


@pytest.mark.parametrize("shape", ["prompt", "messages"])
def test_prompt_completion_and_chat_records_train(workdir, tmp_path, shape):
    rows = []
    for i in range(16):
        q, a = " ".join(WORDS[i : i + 4]), " ".join(WORDS[i + 4 : i + 8])
        if shape == "prompt":
            rows.append({"prompt": f"question {q} answer", "completion": f" {a}"})
        else:
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = train(_config(workdir, tmp_path / "p.spra", data=str(tmp_path / "d.jsonl"), steps=4), progress=False)
    assert summary["steps"] == 4 and Adapter.load(tmp_path / "p.spra").num_values > 0


def test_examples_truncation_drops_are_reported_and_recorded(workdir, tmp_path, call_cli):
    # Short prompts keep their completion within 8 tokens; 12-word prompts leave it beyond the cut.
    short = [{"prompt": " ".join(WORDS[i : i + 3]), "completion": " " + WORDS[i + 3]} for i in range(8)]
    long = [{"prompt": " ".join(WORDS[i : i + 12]), "completion": " " + WORDS[i + 12]} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short + long))
    args = ["train", workdir / "base", "--data", tmp_path / "d.jsonl", "--eval-data", tmp_path / "d.jsonl",
            "--max-length", "8", "--steps", "1", "--device", "cpu"]  # fmt: skip
    rc, out, err = call_cli(*args, "-o", tmp_path / "a.spra")
    assert rc == 0, err
    counts = "16 records -> 8 examples, {} tokens (8 truncated to --max-length 8, 8 dropped (truncation left them"
    (line,) = [x for x in out.splitlines() if x.startswith("data: ")]
    kept_tokens = sum(1 + 4 + 1 for _ in short)  # bos, prompt and completion words, eos
    assert line.startswith("data: " + counts.format(kept_tokens)) and "; eval: " + counts.format(kept_tokens) in line
    record = {"records": 16, "examples": 8, "truncated": 8, "dropped": 8}
    provenance = Adapter.load(tmp_path / "a.spra").provenance
    assert provenance["data"] == record and provenance["eval_data"] == record

    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long))
    rc, _, err = call_cli(*args[:3], tmp_path / "long.jsonl", *args[4:], "-o", tmp_path / "b.spra")
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert "long.jsonl" in err and "all 8" in err and "--max-length" in err
    assert not (tmp_path / "b.spra").exists()


def test_yaml_config_with_flags_on_top_is_stored_in_the_provenance(workdir, tmp_path, call_cli):
    (tmp_path / "run.yaml").write_text(
        f"base: {workdir / 'base'}\ndata: {workdir / 'corpus.jsonl'}\nsteps: 3\nlr: 0.001\ndensity: 0.02\n"
        "grad-accum: 2\ndevice: cpu\n"
    )
    rc, _, err = call_cli("train", "--config", tmp_path / "run.yaml", "--lr", "0.003", "-o", tmp_path / "y.spra")
    assert rc == 0, err
    stored = Adapter.load(tmp_path / "y.spra").provenance["config"]
    assert stored["lr"] == 0.003 and stored["grad_accum"] == 2 and stored["density"] == 0.02 and stored["steps"] == 3


def test_bad_inputs_fail_in_one_line_and_write_nothing(workdir, tmp_path, call_cli):
    (tmp_path / "bad.jsonl").write_text('{"text": "the cat"}\n{"text": \n')
    build_tiny_model("llama", tmp_path / "notok", torch.bfloat16)  # a checkpoint without a tokenizer
    cases = [
        (["train", workdir / "base", "--data", tmp_path / "bad.jsonl"], "bad.jsonl"),
        (["train", tmp_path / "notok", "--data", workdir / "corpus.jsonl"], "tokenizer"),
        (["train", workdir / "base", "--data", tmp_path / "missing.jsonl"], "missing.jsonl"),
        (["train", workdir / "base", "--data", workdir / "corpus.jsonl", "--density", "2"], "--density"),
        (["train", workdir / "base", "--data", workdir / "corpus.jsonl", "--early-stopping", "2"], "--eval-data"),
    ]
    for args, needle in cases:
        rc, _, err = call_cli(*args, "-o", tmp_path / "out.spra", "--steps", "2", "--device", "cpu")
        assert rc == 1 and needle in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / "out.spra").exists()


def test_every_path_and_the_resume_are_checked_before_the_base_is_opened(workdir, tmp_path, call_cli, monkeypatch):
    import spra_tools.checkpoint

    def opened(*_):
        raise AssertionError("the base was opened")

    monkeypatch.setattr(spra_tools.checkpoint, "open_checkpoint", opened)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "d.txt").write_text("")
    common = ["--steps", "2", "--device", "cpu", "--lr", "1e-3"]
    settings = TrainConfig.resolve(None, {"base": str(workdir / "base"), "data": str(workdir / "corpus.jsonl"),
                                          "output": "x", "steps": 2, "device": "cpu", "lr": 1e-2}).run_settings()  # fmt: skip
    (tmp_path / "ck" / "last").mkdir(parents=True)
    (tmp_path / "ck" / "last" / "state.json").write_text(json.dumps({"config": settings}))
    cases = [  # (flags replacing or added to the good ones, what the one error line says)
        ({"--data": tmp_path / "missing.jsonl"}, "missing.jsonl: no such file"),
        ({"--data": tmp_path / "d.txt"}, "unknown data format '.txt'"),
        ({"--eval-data": tmp_path / "dev.jsonl"}, "dev.jsonl: no such file"),
        ({"--config": tmp_path / "run.yml"}, "cannot read the config"),
        ({"-o": tmp_path / "no" / "out.spra"}, "output directory does not exist"),
        ({"--checkpoint-dir": tmp_path / "a-file" / "ck"}, "cannot be the checkpoint directory"),
        ({"--log-dir": tmp_path / "a-file" / "logs"}, "cannot be the log directory"),
        ({"--checkpoint-dir": tmp_path / "ck", "--resume": None}, "different settings (lr)"),
    ]
    for given, needle in cases:
        flags = {"--data": workdir / "corpus.jsonl", "-o": tmp_path / "out.spra", **given}
        argv = [a for flag, value in flags.items() for a in ((flag,) if value is None else (flag, value))]
        rc, _, err = call_cli("train", workdir / "base", *argv, *common)
        assert rc == 1 and needle in err and len(err.strip().splitlines()) == 1, (given, err)
        assert not (tmp_path / "out.spra").exists()


def test_a_damaged_checkpoint_fails_in_one_line_and_writes_nothing(workdir, tmp_path, call_cli):
    args = ["train", workdir / "base", "--data", workdir / "corpus.jsonl", "--steps", "2", "--device", "cpu",
            "--checkpoint-dir", tmp_path / "ck"]  # fmt: skip
    rc, _, err = call_cli(*args, "-o", tmp_path / "first.spra")
    assert rc == 0, err
    last = tmp_path / "ck" / "last"
    state = json.loads((last / "state.json").read_text())
    tensors = (last / "state.safetensors").read_bytes()
    damages = [
        ("state.safetensors", tensors[: len(tensors) // 2], "cannot read the checkpoint"),
        ("state.json", "[1, 2]", "is not an object"),
        ("state.json", json.dumps({k: v for k, v in state.items() if k != "batches"}), "incomplete or damaged"),
    ]
    for name, content, needle in damages:
        (last / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        rc, _, err = call_cli(*args, "--resume", "-o", tmp_path / "again.spra")
        assert rc == 1 and needle in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not (tmp_path / "again.spra").exists()
        (last / "state.json").write_text(json.dumps(state))
        (last / "state.safetensors").write_bytes(tensors)


def test_a_second_run_in_a_checkpoint_dir_is_refused_in_one_line(workdir, tmp_path, call_cli):
    import fcntl

    (tmp_path / "ck").mkdir()
    with open(tmp_path / "ck" / checkpoints.LOCK, "w") as f:  # another run holds the directory
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("4242 on elsewhere\n")
        f.flush()
        rc, _, err = call_cli("train", workdir / "base", "--data", workdir / "corpus.jsonl", "--steps", "1",
                              "--device", "cpu", "--checkpoint-dir", tmp_path / "ck", "-o", tmp_path / "a.spra")  # fmt: skip
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert "another train run (pid 4242 on elsewhere) is using this checkpoint directory" in err
    assert not (tmp_path / "a.spra").exists() and not (tmp_path / "ck" / "last").exists()


def test_last_is_a_complete_checkpoint_at_every_moment(workdir, tmp_path, monkeypatch):
    import os

    state = tmp_path / "ck" / "last" / "state.json"

    def watched(fn):
        def call(*args, **kwargs):
            before = state.is_file()
            result = fn(*args, **kwargs)
            assert state.is_file() or not before, f"{fn.__name__}{args} left no complete checkpoint at last"
            return result

        return call

    for name in ("rename", "replace", "symlink", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, watched(getattr(os, name)))
    config = _config(workdir, tmp_path / "a.spra", steps=3, checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=1)
    train(config, progress=False)  # four checkpoints: after each step, and at the end
    monkeypatch.undo()
    assert json.loads(state.read_text())["bookkeeping"]["step"] == 3
    assert [p.name for p in (tmp_path / "ck").iterdir() if p.name.startswith("step-")] == [state.parent.resolve().name]

    # A checkpoint dir whose last is a plain directory (as earlier versions wrote it) resumes and moves on.
    target = state.parent.resolve()
    (tmp_path / "ck" / "last").unlink()
    target.rename(tmp_path / "ck" / "last")
    train(_config(workdir, tmp_path / "b.spra", steps=3, checkpoint_dir=str(tmp_path / "ck"), resume=True,
                  checkpoint_every=1), progress=False)  # fmt: skip
    assert (tmp_path / "ck" / "last").is_symlink() and json.loads(state.read_text())["bookkeeping"]["step"] == 3
    assert len([p for p in (tmp_path / "ck").iterdir() if p.name.startswith("step-")]) == 1


def test_early_stopping_keeps_the_best_adapter(workdir, tmp_path):
    # A learning rate far too high: the evaluation loss soon gets worse, and training stops.
    config = _config(workdir, tmp_path / "e.spra", lr=3.0, steps=40, eval_data=str(workdir / "corpus.jsonl"),
                     eval_every=2, early_stopping=1)  # fmt: skip
    summary = train(config, progress=False)
    provenance = Adapter.load(tmp_path / "e.spra").provenance
    assert provenance["steps"] < 40
    assert provenance["best_eval"]["step"] == summary["best_eval"]["step"] < provenance["steps"]


def test_sparse_model_inside_transformers_trainer(workdir, tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "base", dtype=torch.float32)
    sm = SparseModel(model, density=0.05, seed=0, targets=["all-linear", r"lm_head\.weight$"])
    texts = [json.loads(x)["text"] for x in (workdir / "corpus.jsonl").read_text().splitlines()]
    examples = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)}
                for ids in (tokenizer(t)["input_ids"][:16] for t in texts) if len(ids) >= 16]  # fmt: skip
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, max_steps=30, learning_rate=1e-2,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        remove_unused_columns=False, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=sm, args=args, train_dataset=examples, optimizers=(SparseAdamW(sm, lr=1e-2), None)
    )
    trainer.train()
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    assert losses[-1] < 0.6 * losses[0]
    sm.save(tmp_path / "t.spra")
    assert Adapter.load(tmp_path / "t.spra").num_values == sum(p.numel() for p in sm.parameters())


TWO_GPUS = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")],
)


@pytest.mark.parametrize("device", ["cpu", TWO_GPUS])
def test_torchrun_two_processes_train_the_adapter_of_one(workdir, tmp_path, device):
    """torchrun --nproc-per-node 2 (gloo on CPU, NCCL on GPUs), batch 2 each = one process, batch 4."""
    import subprocess
    import sys

    from conftest import _clean_env

    args = ["train", workdir / "base", "--data", workdir / "corpus.jsonl", "--steps", "6", "--lr", "1e-3",
            "--density", "0.05", "--device", device, "--dtype", "fp32", "--values-dtype", "fp32", "--seed", "3"]  # fmt: skip
    env = _clean_env({"OMP_NUM_THREADS": "1"})
    one = subprocess.run([sys.executable, "-m", "spra_tools", *map(str, args), "--batch-size", "4",
                          "-o", tmp_path / "one.spra"], capture_output=True, text=True, env=env)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "spra_tools", *map(str, args), "--batch-size", "2", "-o", tmp_path / "two.spra"],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = Adapter.load(tmp_path / "one.spra"), Adapter.load(tmp_path / "two.spra")
    assert b.provenance["steps"] == 6 and b.provenance["tokens"] == a.provenance["tokens"]
    for name, delta in a.deltas.items():
        assert delta.values.abs().sum() > 0
        torch.testing.assert_close(b.deltas[name].values, delta.values, rtol=1e-3, atol=2e-5, msg=name)


def test_sparse_model_inside_trl_sft_trainer(workdir, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "base", dtype=torch.float32)
    sm = SparseModel(model, density=0.05, seed=0, targets=["all-linear", r"lm_head\.weight$"])
    texts = [json.loads(x)["text"] for x in (workdir / "corpus.jsonl").read_text().splitlines()]
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=30, learning_rate=1e-2,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        disable_tqdm=True, max_length=32, gradient_checkpointing_kwargs={"use_reentrant": False},
    )  # fmt: skip
    trainer = trl.SFTTrainer(model=sm, args=args, train_dataset=datasets.Dataset.from_list([{"text": t} for t in texts]),
                             processing_class=tokenizer, optimizers=(SparseAdamW(sm, lr=1e-2), None))  # fmt: skip
    trainer.train()
    assert model.is_gradient_checkpointing  # TRL's default, through SparseModel to the wrapped model
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    assert losses[-1] < 0.7 * losses[0], losses


def test_a_resume_on_another_base_is_refused_before_the_model_loads(workdir, tmp_path, call_cli, monkeypatch):
    """The same path, another model of the same architecture (the settings all agree): the
    checkpoint's record of the base's weights tells them apart, before the model is loaded."""

    def loaded(*_):
        raise AssertionError("the model was loaded")

    other = tmp_path / "base"
    shutil.copytree(workdir / "base", other)
    identity = checkpoints.base_identity(open_checkpoint(other))
    build_tiny_model("llama", other, torch.bfloat16, hidden=128, layers=2, seed=7)  # replaced in place
    assert checkpoints.base_identity(open_checkpoint(other))["layout"] == identity["layout"]
    flags = ["--data", workdir / "corpus.jsonl", "--steps", "2", "--device", "cpu", "--checkpoint-dir", tmp_path / "ck"]
    settings = TrainConfig.resolve(None, {"base": str(other), "data": str(workdir / "corpus.jsonl"), "output": "x",
                                          "steps": 2, "device": "cpu"}).run_settings()  # fmt: skip
    (tmp_path / "ck" / "last").mkdir(parents=True)
    (tmp_path / "ck" / "last" / "state.json").write_text(json.dumps({"config": settings, "base": identity}))
    monkeypatch.setattr(loop, "_load_model", loaded)
    rc, _, err = call_cli("train", other, *flags, "--resume", "-o", tmp_path / "out.spra")
    assert rc == 1 and "made on another base (its weights differ)" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.spra").exists()
