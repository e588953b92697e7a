"""Bad input to the algebra commands (merge, stack, reseed, diff, convert): one line, exit 1, nothing written.

The same contract and checks as tests/test_errors.py (whose machinery this module uses: the `w`
work-directory fixture, `Bad`, `check_refused`): stderr is one line naming the file, the exit code
is 1, no traceback, no output or temporary appears, and every input is byte-identical afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import test_errors
import torch
from test_errors import Bad, W, check_refused

from spra_tools.adapter import Adapter, TensorDelta
from spra_tools.checkpoint import open_checkpoint
from spra_tools.support import ExplicitSupport, SeededSupport
from spra_tools.surgery import create_adapter

# test_errors' work-directory fixture and the inputs it is built from.
w = test_errors.w
other_llama, wide_llama, fp32_adapter = test_errors.other_llama, test_errors.wide_llama, test_errors.fp32_adapter
REPO = Path(__file__).resolve().parents[1]
CASES: list[tuple[str, Callable[[W], Bad]]] = []


def case(case_id: str):
    def register(build: Callable[[W], Bad]) -> Callable[[W], Bad]:
        CASES.append((case_id, build))
        return build

    return register


def _created(w: W, name: str, seed: int, base: Path | None = None, density: float = 0.05) -> Path:
    """A zero-valued seeded V/O adapter of `base` (default: the tiny Llama) under w.tmp."""
    path = w.tmp / name
    create_adapter(open_checkpoint(base or w.base), density, seed).save(path)
    return path


# -- merge ------------------------------------------------------------------------------------


@case("merge-different-seeds-without-base")
def _(w):
    other = _created(w, "seed99.spra", 99)
    return Bad(["merge", w.seeded, other, "-o", w.new_spra], "add --base BASE", w.seeded)


@case("merge-ties-without-base")
def _(w):
    argv = ["merge", w.seeded, w.seeded, "-o", w.new_spra, "--method", "ties", "--density", "0.5"]
    return Bad(argv, "the fingerprints of the smaller support need the base weights: add --base BASE")


# -- outputs: every one checked before the work; all written or none ---------------------------


def _with_report(w: W, command: str, report: Path) -> list:
    inputs = [w.seeded, w.seeded] if command == "merge" else [w.base, w.other]
    return [command, *inputs, "-o", w.new_spra, "--report", report]


@pytest.mark.parametrize("command", ["merge", "diff"])
def test_report_parent_missing_writes_nothing(command, w, call_cli, snapshot):
    missing = w.tmp / "missing"
    bad = Bad(_with_report(w, command, missing / "r.json"), "output directory does not exist", missing)
    check_refused(bad, w, call_cli, snapshot)


@pytest.mark.parametrize("command", ["merge", "diff"])
def test_report_that_is_a_directory_is_not_replaced(command, w, call_cli, snapshot):
    folder = w.tmp / "reports"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    bad = Bad(_with_report(w, command, folder), "is a directory", folder)
    check_refused(bad, w, call_cli, snapshot)


@pytest.mark.parametrize("command", ["merge", "diff"])
def test_report_write_failure_leaves_no_output(command, w, call_cli, monkeypatch):
    """A report that cannot be written once the work is done (a full disk): neither file appears."""
    import pathlib

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    report = w.tmp / "r.json"
    r = call_cli(*_with_report(w, command, report))
    assert r.rc == 1 and r.stderr == f"spra-tools: error: {report}: cannot write (No space left on device)\n"
    assert sorted(p.name for p in w.tmp.iterdir()) == []


# -- reseed ------------------------------------------------------------------------------------


@case("reseed-compact-no-density-reproduces")
def _(w):
    # Two blocks of 2**16, all 100 indices in the first: floor(d * 2**16) = floor(d * 2**17) = 100
    # has no solution, so no seed and density give this support.
    name = "model.layers.0.mlp.big.weight"
    support = ExplicitSupport(2 * 65536, np.arange(100))
    delta = TensorDelta(
        name, (2, 65536), torch.bfloat16, support, torch.ones(100, dtype=torch.bfloat16), {"BF16": "0" * 16}
    )
    path = w.tmp / "uneven.spra"
    Adapter({name: delta}, base={"name": "x"}).save(path)
    return Bad(["reseed", path, "--compact", "--seed", "7", "-o", w.new_spra], "no density reproduces", path)


@case("reseed-base-other-shapes")
def _(w):
    wide = _created(w, "wide.spra", 7, base=w.wide)  # [128, 128] tensors against a [64, 64] base
    argv = ["reseed", wide, "--base", w.base, "--seed", "5", "-o", w.new_spra]
    return Bad(argv, "shape [64, 64] in the base, [128, 128] in the adapter", wide)


@case("reseed-base-wrong-fingerprints")
def _(w):
    # Same shapes, other weights: reseeding must not launder the wrong base into new fingerprints.
    argv = ["reseed", w.seeded, "--base", w.other, "--seed", "5", "-o", w.new_spra]
    return Bad(argv, "fingerprint mismatch", w.seeded)


@case("reseed-base-wrong-fingerprints-same-seed")
def _(w):
    argv = ["reseed", w.seeded, "--base", w.other, "--seed", "1234", "-o", w.new_spra]
    return Bad(argv, "fingerprint mismatch", w.seeded)


@case("reseed-base-lacks-the-tensor")
def _(w):
    adapter = Adapter.load(w.seeded)
    old = next(iter(adapter.deltas))
    d = adapter.deltas.pop(old)
    name = old.replace("layers.0.", "layers.9.")
    support = SeededSupport(d.support.seed, name, d.numel, d.support.density)
    adapter.deltas[name] = TensorDelta(name, d.shape, d.dtype, support, d.values, d.fingerprint)
    adapter.save(path := w.tmp / "extra.spra")
    argv = ["reseed", path, "--base", w.base, "--seed", "5", "-o", w.new_spra]
    return Bad(argv, f"tensor '{name}': not in the base", path)


# -- stack -------------------------------------------------------------------------------------


@case("stack-other-shapes")
def _(w):
    wide = _created(w, "wide.spra", 7, base=w.wide)
    argv = ["stack", w.base, w.seeded, wide, "-o", w.new_spra]
    return Bad(argv, "shape [64, 64] in the base, [128, 128] in the adapter", wide)


@pytest.mark.parametrize("build", [pytest.param(b, id=i) for i, b in CASES])
def test_refused(build, w, call_cli, snapshot):
    check_refused(build(w), w, call_cli, snapshot)


def test_different_seeds_show_base_in_readme_and_help(call_cli):
    """The README's and --help's merge examples show --base where the seeds differ."""
    readme = (REPO / "README.md").read_text()
    examples = [line for line in readme.splitlines() if line.startswith("spra-tools merge ")]
    assert any("--base" in line and "seed" in line for line in examples), examples
    help_text = call_cli("merge", "--help").stdout
    assert re.search(r"spra-tools merge \S+ \S+ -o \S+ --base \S+ +# different seeds", help_text), help_text


def test_adapter_write_failure_names_the_output(w, call_cli, monkeypatch):
    import spra_tools.format as fmt

    def full(f, spra):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fmt, "write_spra", full)
    r = call_cli(*_with_report(w, "merge", w.tmp / "r.json"))
    assert r.rc == 1 and r.stderr == f"spra-tools: error: {w.new_spra}: cannot write (No space left on device)\n"
    assert sorted(p.name for p in w.tmp.iterdir()) == []


def _nan_adapter(w: W) -> Path:
    return Path(test_errors._nonfinite(w, float("nan"), "nan.spra").argv[2])


# (id, build: w -> (argv, the file stderr must name, or None))
NONFINITE = [
    ("merge-nan-input", lambda w: (["merge", p := _nan_adapter(w), w.seeded, "-o", w.new_spra], p)),
    ("merge-overflow", lambda w: (["merge", w.seeded, w.seeded, "-o", w.new_spra, "--weights", "1e39,1e39"], None)),
    ("stack-nan-input", lambda w: (["stack", w.base, p := _nan_adapter(w), "-o", w.new_spra], p)),
]


@pytest.mark.parametrize("build", [pytest.param(b, id=i) for i, b in NONFINITE])
def test_nonfinite_refusals_suggest_only_existing_options(build, w, call_cli, snapshot):
    argv, names = build(w)
    check_refused(Bad(argv, "Inf", names), w, call_cli, snapshot)
    hinted = re.findall(r"--[a-z][a-z-]+", call_cli(*argv).stderr)
    help_text = call_cli(argv[0], "--help").stdout
    assert all(option in help_text for option in hinted), f"suggests {hinted}, which {argv[0]} does not accept"


# (command, w -> argv before --density): every command that takes --density
DENSITY_COMMANDS = {
    "diff": lambda w: ["diff", w.base, w.other, "-o", w.new_spra],
    "merge": lambda w: ["merge", w.seeded, w.seeded, "-o", w.new_spra, "--method", "ties", "--base", w.base],
    "reseed": lambda w: ["reseed", w.seeded, "--seed", "5", "--base", w.base, "-o", w.new_spra],
    "reseed-compact": lambda w: ["reseed", w.explicit, "--seed", "5", "--compact", "-o", w.new_spra],
    "convert": lambda w: ["convert", w.seeded, "-o", w.tmp / "ps", "--base", w.base],
    "create": lambda w: ["create", w.base, "-o", w.new_spra, "--seed", "1"],
}


@pytest.mark.parametrize("value", ["0", "2", "nan", "-1"])
@pytest.mark.parametrize("command", list(DENSITY_COMMANDS))
def test_density_is_validated_alike_everywhere(command, value, w, call_cli, snapshot):
    argv = [*DENSITY_COMMANDS[command](w), "--density", value]
    check_refused(Bad(argv, f"density must be in (0, 1], got {float(value)}"), w, call_cli, snapshot)
