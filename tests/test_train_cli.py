"""`spra-tools train`'s options are generated from TrainConfig's fields: every setting is a flag with
the field's help, choices and default; every flag reaches the config; `--help` needs no torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

import click
import pytest
from click.testing import CliRunner

from spra_tools.cli import cli
from spra_tools.train import loop
from spra_tools.train.config import TrainConfig

# A value other than the default for every setting, as the CLI spells it and as the config holds it.
GIVEN = {
    "data": (["--data", "d.jsonl"], "d.jsonl"),
    "output": (["-o", "o.spra"], "o.spra"),
    "task": (["--task", "seq-cls"], "seq-cls"),
    "density": (["--density", "0.5"], 0.5),
    "seed": (["--seed", "18446744073709551615"], 2**64 - 1),
    "targets": (["--targets", "vo", "--targets", "mlp"], ("vo", "mlp")),
    "exclude": (["--exclude", r"layers\.0\."], (r"layers\.0\.",)),
    "steps": (["--steps", "7"], 7),
    "epochs": ([], None),  # --steps given: --epochs stays unset
    "lr": (["--lr", "3e-3"], 3e-3),
    "batch_size": (["--batch-size", "3"], 3),
    "grad_accum": (["--grad-accum", "2"], 2),
    "max_length": (["--max-length", "64"], 64),
    "packing": (["--no-packing"], False),
    "group_by_length": (["--no-group-by-length"], False),
    "warmup": (["--warmup", "0.25"], 0.25),
    "schedule": (["--schedule", "linear"], "linear"),
    "weight_decay": (["--weight-decay", "0.1"], 0.1),
    "max_grad_norm": (["--max-grad-norm", "0.5"], 0.5),
    "betas": (["--betas", "0.8", "0.95"], (0.8, 0.95)),
    "eps": (["--eps", "1e-6"], 1e-6),
    "eval_data": (["--eval-data", "e.jsonl"], "e.jsonl"),
    "eval_every": (["--eval-every", "5"], 5),
    "early_stopping": (["--early-stopping", "2"], 2),
    "checkpoint_dir": (["--checkpoint-dir", "ck"], "ck"),
    "checkpoint_every": (["--checkpoint-every", "3"], 3),
    "resume": (["--resume"], True),
    "device": (["--device", "cpu"], "cpu"),
    "dtype": (["--dtype", "fp32"], "fp32"),
    "quantize": (["--quantize", "nf4"], "nf4"),
    "gradient_checkpointing": (["--gradient-checkpointing"], True),
    "fsdp": (["--fsdp"], True),
    "log_dir": (["--log-dir", "logs"], "logs"),
    "values_dtype": (["--values-dtype", "fp32"], "fp32"),
    "overwrite": (["--overwrite"], True),
}


def _options() -> dict[str, click.Option]:
    return {p.name: p for p in cli.commands["train"].params if isinstance(p, click.Option)}


def test_every_setting_is_a_flag_that_reaches_the_config(monkeypatch):
    settings = {f.name for f in dataclasses.fields(TrainConfig)} - {"base", "version"}
    assert set(GIVEN) == settings
    seen = []
    monkeypatch.setattr(loop, "train", lambda config, **_: seen.append(config))
    args = [a for flags, _ in GIVEN.values() for a in flags]
    result = CliRunner().invoke(cli, ["train", "BASE", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert config.base == "BASE"
    for name, (_, value) in GIVEN.items():
        assert getattr(config, name) == value, name


def test_help_choices_and_defaults_come_from_the_fields():
    options = _options()
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("base", "version"):
            continue
        option = options[field.name]
        assert option.help == field.metadata["help"], field.name
        assert option.default is None or option.default == (), field.name  # absent: the --config file decides
        shown = option.get_help_extra(click.Context(cli.commands["train"])).get("default")
        if field.default in (dataclasses.MISSING, None, ()) or isinstance(field.default, bool):
            assert shown is None, field.name
        else:
            joiner = ", " if option.multiple else " "
            expected = joiner.join(map(str, field.default)) if isinstance(field.default, tuple) else str(field.default)
            assert shown == expected, field.name
        if typing.get_origin(hints[field.name]) is typing.Literal:
            assert list(option.type.choices) == list(typing.get_args(hints[field.name])), field.name


def test_a_bad_value_is_refused_by_the_config_in_one_line(call_cli):
    rc, _, err = call_cli("train", "BASE", "--data", "d.jsonl", "-o", "o.spra", "--steps", "0")
    assert rc == 1 and err.strip() == "spra-tools: error: --steps must be >= 1", err


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"]])
def test_help_does_not_import_torch(args):
    code = (
        "import sys\nfrom spra_tools.cli import cli\n"
        f"try:\n    cli({args!r}, prog_name='spra-tools')\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: spra-tools" in proc.stdout
