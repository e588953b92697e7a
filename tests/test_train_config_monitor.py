"""TrainConfig (YAML + flags, validation, round trip, lr schedule) and Monitor (log, TensorBoard, plot, summary)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from spra_tools.errors import SpraError
from spra_tools.train import monitor as monitor_mod
from spra_tools.train.config import TrainConfig, lr_at, schedule_factor
from spra_tools.train.monitor import Monitor, classification_metrics, read_log

REQ = {"base": "gpt2", "data": "train.jsonl", "output": "out.spra"}


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**REQ, **kw})


# ----------------------------------------------------------------------------------------------
# TrainConfig


def test_defaults():
    c = cfg()
    assert (c.task, c.density, c.lr, c.schedule, c.targets) == ("causal-lm", 0.01, 2e-4, "cosine", ("all-linear",))
    assert c.steps is None and c.epochs == 1.0  # neither given: one epoch
    assert c.version == 1


def test_values_dtype_offers_what_every_command_offers():
    from spra_tools.cli import cli

    for dtype in ("bf16", "fp16", "fp32"):
        assert cfg(values_dtype=dtype).values_dtype == dtype
    offered = {name: p.type.choices for name, c in cli.commands.items() for p in c.params if p.name == "values_dtype"}
    assert {"train", "create", "diff", "stack"} <= set(offered)
    assert all(list(choices) == ["bf16", "fp16", "fp32"] for choices in offered.values()), offered


def test_coercion():
    c = cfg(targets=["vo", r"mlp\.down"], exclude="layers\\.0\\.", betas=[0.9, 0.95], warmup=10, lr="1e-4")
    assert c.targets == ("vo", r"mlp\.down") and c.exclude == ("layers\\.0\\.",)
    assert c.betas == (0.9, 0.95) and c.warmup == 10.0 and c.lr == 1e-4


BAD = [
    ({"density": 0}, "--density must be in (0, 1]"),
    ({"density": 1.5}, "--density must be in (0, 1]"),
    ({"seed": -1}, "--seed must be an integer in [0, 2**64), got -1"),
    ({"seed": 2**64}, "--seed must be an integer in [0, 2**64), got 18446744073709551616"),
    ({"seed": 1.5}, "--seed must be a whole number"),
    ({"steps": 10, "epochs": 1}, "give --steps or --epochs, not both"),
    ({"steps": 0}, "--steps must be >= 1"),
    ({"epochs": 0}, "--epochs must be > 0"),
    ({"lr": 0}, "--lr must be > 0"),
    ({"lr": "fast"}, "--lr must be a number"),
    ({"lr": float("nan")}, "--lr must be finite"),
    ({"batch_size": 0}, "--batch-size must be >= 1"),
    ({"grad_accum": 0}, "--grad-accum must be >= 1"),
    ({"max_length": 1}, "--max-length must be >= 2"),
    ({"packing": True, "task": "seq-cls"}, "--packing only applies to --task causal-lm"),
    ({"packing": "yes"}, "--packing must be true or false"),
    ({"warmup": -0.1}, "--warmup must be a fraction in [0, 1) or a whole number of steps"),
    ({"warmup": 2.5}, "--warmup must be a fraction in [0, 1) or a whole number of steps"),
    ({"schedule": "step"}, "--schedule must be one of cosine, linear, constant"),
    ({"task": "qa"}, "--task must be one of causal-lm, seq-cls"),
    ({"device": "tpu"}, "--device must be one of auto, cpu, cuda"),
    ({"dtype": "fp16"}, "--dtype must be one of bf16, fp32"),
    ({"values_dtype": "fp8"}, "--values-dtype must be one of bf16, fp16, fp32"),
    ({"weight_decay": -1}, "--weight-decay must be >= 0"),
    ({"max_grad_norm": -1}, "--max-grad-norm must be >= 0"),
    ({"betas": (0.9, 1.0)}, "--betas must both be in [0, 1)"),
    ({"betas": (0.9,)}, "--betas must be 2 numbers"),
    ({"eps": 0}, "--eps must be > 0"),
    ({"eval_every": 10}, "--eval-every needs --eval-data"),
    ({"eval_every": 0, "eval_data": "e.jsonl"}, "--eval-every must be >= 1"),
    ({"early_stopping": 3}, "--early-stopping needs --eval-data"),
    ({"early_stopping": 3, "eval_data": "e.jsonl"}, "--early-stopping needs --eval-every"),
    ({"early_stopping": 0, "eval_data": "e.jsonl", "eval_every": 5}, "--early-stopping must be >= 1"),
    ({"checkpoint_every": 10}, "--checkpoint-every needs --checkpoint-dir"),
    ({"checkpoint_every": 0, "checkpoint_dir": "ck"}, "--checkpoint-every must be >= 1"),
    ({"resume": True}, "--resume needs --checkpoint-dir"),
    ({"fsdp": True, "quantize": "nf4"}, "--fsdp and --quantize cannot be combined"),
    ({"targets": ()}, "--targets must name at least one preset or regex"),
    ({"targets": ["vo", 3]}, "--targets must be a list of non-empty strings"),
    ({"targets": ["(unclosed"]}, "--targets '(unclosed' is neither a preset"),
    ({"exclude": ["[bad"]}, "--exclude '[bad' is not a valid regex"),
    ({"data": ""}, "--data must be a non-empty string"),
    ({"base": 7}, "BASE must be a non-empty string"),
    ({"version": 2}, "train config version 2 is not supported"),
]


@pytest.mark.parametrize("kw,message", BAD, ids=[m.split(" ")[0] + "-" + str(i) for i, (_, m) in enumerate(BAD)])
def test_validation_errors(kw, message):
    with pytest.raises(SpraError) as e:
        cfg(**kw)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_round_trip():
    c = cfg(targets=("vo", "mlp"), exclude=("x",), steps=100, warmup=0.05, betas=(0.8, 0.99), eval_data="e.jsonl",
            eval_every=10, early_stopping=2, checkpoint_dir="ck", checkpoint_every=50, resume=True, log_dir="logs")  # fmt: skip
    d = json.loads(json.dumps(c.to_dict()))
    assert d["targets"] == ["vo", "mlp"] and d["betas"] == [0.8, 0.99] and d["version"] == 1
    assert TrainConfig.from_dict(d) == c
    assert TrainConfig.from_dict(cfg().to_dict()) == cfg()


def test_from_dict_rejects_unknown_and_missing():
    with pytest.raises(SpraError, match="unknown train settings: colour, learning_rate"):
        TrainConfig.from_dict({**REQ, "learning_rate": 1, "colour": "red"})
    with pytest.raises(SpraError, match="missing required train settings: data, output"):
        TrainConfig.from_dict({"base": "gpt2"})


def write(tmp_path, text, name="train.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_resolve_yaml_and_precedence(tmp_path):
    path = write(
        tmp_path,
        "base: gpt2\ndata: train.jsonl\noutput: out.spra\n"
        "grad-accum: 4\nbatch_size: 2\nlr: 1e-4\ntargets: vo\nepochs: 3\nlog-dir: logs\nversion: 1\n",
    )
    c = TrainConfig.resolve(path, {})
    # dash spelling, a YAML-1.1 string "1e-4", a lone target string
    assert (c.grad_accum, c.batch_size, c.lr, c.targets, c.epochs, c.log_dir) == (4, 2, 1e-4, ("vo",), 3.0, "logs")
    # flags win; None and () mean "not given"; a dashed override key is accepted too
    flags = {"lr": 3e-4, "batch_size": None, "grad-accum": 8, "exclude": (), "targets": None, "output": "b.spra"}
    c = TrainConfig.resolve(path, flags)
    assert (c.lr, c.batch_size, c.grad_accum, c.targets, c.output) == (3e-4, 2, 8, ("vo",), "b.spra")
    # --steps replaces the file's epochs instead of clashing with it
    c = TrainConfig.resolve(path, {"steps": 50})
    assert (c.steps, c.epochs) == (50, None)


def test_resolve_without_file_and_empty_file(tmp_path):
    assert TrainConfig.resolve(None, {**REQ, "density": None}) == cfg()
    assert TrainConfig.resolve(write(tmp_path, ""), REQ) == cfg()
    with pytest.raises(SpraError, match="missing required train settings: base, data, output"):
        TrainConfig.resolve(None, {})


def test_resolve_errors(tmp_path):
    bad = write(tmp_path, "base: gpt2\ndata: [unclosed\n", "bad.yaml")
    with pytest.raises(SpraError) as e:
        TrainConfig.resolve(bad, {})
    assert str(e.value).startswith(bad + ": the config is not valid YAML") and "\n" not in str(e.value)

    for text, message in [
        ("- a\n- b\n", "config must be a mapping"),
        ("base: gpt2\nlearning-rate: 1\nepoch: 2\n", "unknown train settings in the config: epoch, learning-rate"),
        ("grad_accum: 2\ngrad-accum: 4\n", "setting grad_accum given twice"),
    ]:
        path = write(tmp_path, text, "c.yaml")
        with pytest.raises(SpraError) as e:
            TrainConfig.resolve(path, REQ)
        assert e.value.path == path and message in e.value.message

    with pytest.raises(SpraError, match="cannot read the config"):
        TrainConfig.resolve(str(tmp_path / "missing.yaml"), REQ)
    with pytest.raises(SpraError, match="--density must be in"):
        TrainConfig.resolve(write(tmp_path, "density: 2\n"), REQ)


def test_warmup_and_total_steps():
    assert cfg(warmup=0.1).warmup_steps(100) == 10
    assert cfg(warmup=0.25).warmup_steps(10) == 3  # ceil(2.5)
    assert cfg(warmup=5).warmup_steps(100) == 5
    assert cfg(warmup=50).warmup_steps(20) == 20  # never beyond the run
    assert cfg(warmup=0).warmup_steps(100) == 0
    assert cfg(steps=7).total_steps(1000) == 7
    assert cfg(epochs=2, grad_accum=4).total_steps(10) == 5
    assert cfg(epochs=0.5, grad_accum=2).total_steps(7) == 2  # ceil(1.75)


def test_schedule_hand_values():
    # warm-up 10 steps of 110, peak 2e-4: step s < 10 uses (s + 1) / 10
    c = cfg(lr=2e-4, warmup=10)
    assert [schedule_factor(s, 110, c) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert schedule_factor(10, 110, c) == pytest.approx(1.0)  # first step after warm-up is the peak
    assert lr_at(60, 110, c) == pytest.approx(1e-4)  # cosine mid-point (p = 50/100): half the peak
    assert lr_at(109, 110, c) == pytest.approx(2e-4 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    assert schedule_factor(110, 110, c) == pytest.approx(0.0)
    # the same warm-up given as a fraction
    f = cfg(lr=2e-4, warmup=1 / 11)
    assert [lr_at(s, 110, f) for s in range(110)] == pytest.approx([lr_at(s, 110, c) for s in range(110)])
    # cosine without warm-up over 4 steps: 1, (1 + cos(pi/4))/2, 1/2, (1 + cos(3pi/4))/2
    assert [schedule_factor(s, 4, cfg()) for s in range(4)] == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    # linear over 10 steps: 1 - s/10
    lin = cfg(schedule="linear")
    assert [schedule_factor(s, 10, lin) for s in (0, 5, 9)] == pytest.approx([1.0, 0.5, 0.1])
    # constant after 2 warm-up steps
    const = cfg(schedule="constant", warmup=2)
    assert [schedule_factor(s, 10, const) for s in (0, 1, 2, 9)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        schedule_factor(-1, 10, c)


# ----------------------------------------------------------------------------------------------
# Monitor


def run_fresh(log_dir, echo=None, rank0=True, steps=6, evals=(3, 6)):
    lines = [] if echo is None else echo
    with Monitor(log_dir, total_steps=steps, rank0=rank0, echo=lines.append, progress=False) as mon:
        for s in range(1, steps + 1):
            mon.log_train(s, loss=2.0 / s, lr=1e-4, tokens=100, grad_norm=0.5)
            if s in evals:
                mon.log_eval(s, {"loss": 1.0 + 1 / s, "accuracy": 0.5 + s / 100})
    return mon, lines


def test_metrics_jsonl(tmp_path):
    mon, echoed = run_fresh(tmp_path / "logs")
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [
        (1, "train"), (2, "train"), (3, "train"), (3, "eval"), (4, "train"), (5, "train"), (6, "train"), (6, "eval"),
    ]  # fmt: skip
    first = records[0]
    assert set(first) == {"step", "split", "loss", "lr", "tokens", "grad_norm", "time"}
    assert (first["loss"], first["lr"], first["tokens"], first["grad_norm"]) == (2.0, 1e-4, 100, 0.5)
    assert records[3]["loss"] == pytest.approx(4 / 3) and records[3]["accuracy"] == pytest.approx(0.53)
    assert echoed == ["step 3: eval loss 1.333 accuracy 0.53", "step 6: eval loss 1.167 accuracy 0.56"]
    assert mon.best == {"metric": "loss", "value": pytest.approx(7 / 6), "step": 6}
    assert mon.tokens == 600 and mon.step == 6


def test_non_finite_loss_is_null(tmp_path):
    with Monitor(tmp_path, 2, echo=lambda s: None, progress=False) as mon:
        mon.log_train(1, float("nan"), 1e-4, 10)
    (record,) = read_log(tmp_path / "metrics.jsonl")
    assert record["loss"] is None


def test_best_eval_and_improved():
    mon = Monitor(None, 10, echo=lambda s: None, progress=False)
    assert mon.log_eval(0, {"loss": 1.0}, baseline=True) is False and mon.best is None  # never the best
    assert mon.log_eval(1, {"loss": 2.0}) is True
    assert mon.log_eval(2, {"loss": 2.5}) is False
    assert mon.log_eval(3, {"loss": float("nan")}) is False
    assert mon.log_eval(4, {"loss": 1.5}) is True
    acc = Monitor(None, 10, echo=lambda s: None, progress=False)  # no loss: the highest accuracy
    assert [acc.log_eval(s, {"accuracy": a}) for s, a in [(1, 0.5), (2, 0.4), (3, 0.7)]] == [True, False, True]
    assert acc.best == {"metric": "accuracy", "value": 0.7, "step": 3}
    mon.close()
    acc.close()
    resumed = Monitor(None, 10, echo=lambda s: None, progress=False, resume_step=4, best=(2, {"loss": 1.5}))
    assert resumed.log_eval(6, {"loss": 1.7}) is False and resumed.best == {"metric": "loss", "value": 1.5, "step": 2}
    assert resumed.log_eval(8, {"loss": 1.2}) is True
    resumed.close()


def test_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_fresh(tmp_path)
    assert list(tmp_path.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    train = acc.Scalars("train/loss")
    assert [e.step for e in train] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in train] == pytest.approx([2.0 / s for s in range(1, 7)])
    evals = acc.Scalars("eval/accuracy")
    assert [e.step for e in evals] == [3, 6] and [e.value for e in evals] == pytest.approx([0.53, 0.56])


def test_curves_png(tmp_path):
    run_fresh(tmp_path)
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_resume_truncates_log(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_fresh(tmp_path, steps=6, evals=(3, 6))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "split": "tr')  # a line torn by a crash
    with Monitor(tmp_path, 8, echo=lambda s: None, progress=False, resume_step=3) as mon:
        for s in range(4, 9):
            mon.log_train(s, loss=10.0 + s, lr=1e-4, tokens=100)
    records = read_log(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in records] == [
        (1, "train"), (2, "train"), (3, "train"), (3, "eval"), (4, "train"), (5, "train"), (6, "train"),
        (7, "train"), (8, "train"),
    ]  # fmt: skip
    assert [r["loss"] for r in records if r["split"] == "train"][3:] == [14.0, 15.0, 16.0, 17.0, 18.0]
    text, info = mon.summary()
    assert info["steps"] == 8 and info["resumed_from"] == 3 and info["tokens"] == 500
    assert "steps:        8 (resumed at step 3)" in text

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()  # the first run's steps 4-6 are hidden behind the resumed run's
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")][2:] == [(3, pytest.approx(2 / 3))] + [
        (s, 10.0 + s) for s in range(4, 9)
    ]
    assert [e.step for e in acc.Scalars("eval/loss")] == [3]

    # a fresh run in the same folder starts a new log
    run_fresh(tmp_path, steps=2, evals=())
    assert [r["step"] for r in read_log(tmp_path / "metrics.jsonl")] == [1, 2]


def test_non_rank0_writes_nothing(tmp_path, capsys):
    mon, echoed = run_fresh(tmp_path / "logs", rank0=False)
    assert not (tmp_path / "logs").exists() and echoed == []
    assert mon.best["step"] == 6  # bookkeeping still agrees with rank 0
    assert capsys.readouterr() == ("", "")


def test_progress_bar_and_eval_line(tmp_path, capsys):
    lines = []
    with Monitor(None, 4, echo=lines.append) as mon:
        mon.log_train(1, 1.5, 2e-4, 512)
        mon.log_eval(1, {"loss": 1.25})
    err = capsys.readouterr().err
    assert "loss=1.5" in err and "lr=2.00e-04" in err and "tok/s=" in err
    assert lines == ["step 1: eval loss 1.25"]


def test_summary(tmp_path):
    adapter = tmp_path / "out.spra"
    adapter.write_bytes(b"x" * 2048)
    mon, _ = run_fresh(tmp_path / "logs")
    text, info = mon.summary(adapter)
    assert info["adapter_bytes"] == 2048 and info["tokens"] == 600 and info["steps"] == 6
    assert info["best_eval"] == {"metric": "loss", "value": pytest.approx(7 / 6), "step": 6}
    assert info["peak_memory_bytes"] > 0 and info["peak_memory_kind"] in ("rss", "cuda")
    assert info["tokens_per_s"] > 0 and info["notes"] == []
    assert f"adapter:      {adapter} (2,048 bytes, 2.0 KiB)" in text
    assert "best eval:    loss 1.167 at step 6" in text and "tokens:       600" in text
    assert "note" not in text


def test_missing_optional_packages_are_noted(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        monitor_mod.importlib.util,
        "find_spec",
        lambda n, *a: None if n in ("tensorboard", "matplotlib") else real(n, *a),
    )
    mon, _ = run_fresh(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    text, info = mon.summary()
    assert len(info["notes"]) == 2
    assert "note: TensorBoard events skipped: the tensorboard package is not installed" in text
    assert "note: curves.png skipped: matplotlib is not installed" in text


def test_classification_metrics():
    # accuracy 4/6; per-class F1: class 0: 2*1/(2+2) = 1/2, class 1: 2*1/(1+2) = 2/3, class 2: 2*2/(3+2) = 4/5;
    # class 3 never occurs and is not averaged
    m = classification_metrics([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], num_labels=4)
    assert m == {"accuracy": pytest.approx(4 / 6), "f1": pytest.approx((1 / 2 + 2 / 3 + 4 / 5) / 3)}
    assert classification_metrics([1, 1], [1, 1], 2) == {"accuracy": 1.0, "f1": 1.0}
    assert classification_metrics([0, 0], [1, 1], 2) == {"accuracy": 0.0, "f1": 0.0}
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0], 2)
    with pytest.raises(ValueError):
        classification_metrics([0, 2], [0, 1], 2)
    with pytest.raises(ValueError):
        classification_metrics([], [], 2)
