"""The merge-method registry feeds the CLI; a request takes flags over its recipe; --help stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from spra_tools.algebra.methods import DEFAULT_METHOD, METHODS, merge_method, method_names
from spra_tools.algebra.recipe import MergeRequest, read_recipe
from spra_tools.cli import cli, merge
from spra_tools.errors import SpraError


def test_cli_choices_and_help_come_from_the_registry():
    option = next(p for p in merge.params if p.name == "method")
    assert list(option.type.choices) == method_names()
    assert set(method_names()) == {n for m in METHODS for n in (m.name, *m.aliases)}
    text = CliRunner().invoke(cli, ["merge", "--help"], terminal_width=200).output
    for m in METHODS:
        row = next(line for line in text.splitlines() if line.strip().startswith(", ".join((m.name, *m.aliases))))
        assert m.formula in row
        for p in m.parameters:
            assert p in row.rsplit("[", 1)[1], (m.name, p, row)


@pytest.mark.parametrize("alias,name", [("task_arithmetic", "sum"), ("linear", "weighted"), ("ties", "ties")])
def test_aliases_resolve(alias, name):
    assert merge_method(alias).name == name
    assert MergeRequest().with_flags(method=alias).method == name


def test_parameters_follow_the_declared_pipeline():
    assert merge_method("sum").parameters == ("weights",)
    assert merge_method("mean").parameters == ()
    assert merge_method("ties").parameters == ("weights", "density")
    assert merge_method("dare_linear").parameters == ("weights", "density", "seed")
    with pytest.raises(SpraError, match="takes no weights"):
        merge_method("mean").check_weights([1.0, 2.0], 2)
    with pytest.raises(SpraError, match="density applies only to ties, dare_ties, dare_linear, magnitude_prune"):
        merge_method("weighted").check_density(0.5, 2)


def test_flags_win_over_the_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "merge_method: ties\nbase_model: some/model\nseed: 3\nparameters: {density: 0.5}\n"
        "models:\n  - model: a.spra\n    parameters: {weight: 0.7}\n  - model: b.spra\n    parameters: {weight: 0.3}\n"
    )
    recipe = read_recipe(tmp_path / "r.yaml")
    assert recipe.with_flags() == recipe
    flagged = recipe.with_flags(["x.spra", "y.spra"], "dare_linear", [1.0, 2.0], 0.25, 9, "other/model")
    assert flagged == MergeRequest(("x.spra", "y.spra"), "dare_linear", (1.0, 2.0), 0.25, 9, "other/model")
    # A flag left out keeps the recipe's value, even when the flag's value would be falsy.
    assert recipe.with_flags(seed=0).seed == 0 and recipe.with_flags(seed=0).density == 0.5
    assert MergeRequest().with_flags().method == DEFAULT_METHOD


def test_help_does_not_import_torch():
    # torch costs seconds; numpy (~70 ms) is what the format reader and the torch-free apply run on.
    code = "import sys, spra_tools.cli; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
