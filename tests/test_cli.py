"""The CLI's happy paths: create is deterministic and seed-sensitive, files are small, info/env/demo report."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from click.testing import CliRunner

from spra_tools.adapter import Adapter
from spra_tools.cli import cli
from spra_tools.support import seeded_indices
from spra_tools.testing import build_tiny_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    build_tiny_model("llama", root / "base", shard_size="500KB", hidden=256, layers=4)
    return root / "base"


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_create_is_deterministic_and_seed_sensitive(base, tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        invoke(
            "create",
            base,
            "-o",
            tmp_path / f"{name}.spra",
            "--density",
            "0.01",
            "--seed",
            seed,
            "--targets",
            "all-linear",
        )
    a, b, c = ((tmp_path / f"{n}.spra").read_bytes() for n in "abc")
    assert a == b
    assert a != c
    supports_a = Adapter.load(tmp_path / "a.spra").deltas
    supports_c = Adapter.load(tmp_path / "c.spra").deltas
    assert all(not np.array_equal(supports_a[n].indices(), supports_c[n].indices()) for n in supports_a)


def test_seeded_bf16_file_is_small(base, tmp_path):
    out = tmp_path / "all.spra"
    invoke("create", base, "-o", out, "--density", "0.05", "--seed", 1, "--targets", "all-linear")
    n = Adapter.load(out).num_values
    assert n > 50_000
    assert os.path.getsize(out) <= 2.2 * n + 64 * 1024


def test_info_reports_counts_and_indices(base, tmp_path):
    out = tmp_path / "vo.spra"
    invoke("create", base, "-o", out, "--density", "0.02", "--seed", 3)
    d = json.loads(invoke("info", out, "--json"))
    assert d["support"] == "seeded" and d["tensors"] == 8  # v_proj and o_proj in 4 layers
    assert all(t["name"].endswith(("v_proj.weight", "o_proj.weight")) for t in d["per_tensor"])
    assert abs(d["density_of_targeted"] - 0.02) < 1e-3
    assert 0 < d["fraction_of_model"] < d["density_of_targeted"]
    text = invoke("info", out)
    assert "seeded" in text and "bytes per value" in text and "of the model" in text
    name = d["per_tensor"][0]["name"]
    numel = int(np.prod(d["per_tensor"][0]["shape"]))
    printed = np.array(invoke("info", out, "--indices", name).split(), dtype=np.int64)
    assert np.array_equal(printed, seeded_indices(3, name, numel, 0.02))


def test_verify_and_apply(base, tmp_path):
    out = tmp_path / "t.spra"
    invoke(
        "create", base, "-o", out, "--density", "0.05", "--seed", 0, "--targets", "attn", "--exclude", r"layers\.0\."
    )
    assert "matches" in invoke("verify", base, out)
    invoke("apply", base, out, "-o", tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == sorted(p.name for p in base.iterdir())
    invoke("apply", base, out, out, "-o", tmp_path / "merged", "--overwrite", "--scale", "0.5")


def test_env_reports_extension_status():
    d = json.loads(invoke("env", "--json"))
    assert set(d["extension"]) == {"cpu", "cuda"}
    assert all(v == "ok" or v for v in d["extension"].values())
    assert d["torch"] and d["transformers"] and d["python"]


def test_demo_runs_end_to_end(tmp_path):
    text = invoke("demo", "--workdir", tmp_path)
    assert "bit-identical to the merged one: True" in text
    assert "B/value" in text
    base_loss, merged_loss = map(float, re.search(r"loss ([\d.]+) \(base\) -> ([\d.]+) \(merged\)", text).groups())
    assert merged_loss < 0.6 * base_loss  # the trained adapter, judged by transformers on the applied checkpoint


def test_merge_from_arguments_and_from_a_recipe(base, tmp_path):
    for seed in (1, 2):
        invoke("create", base, "-o", tmp_path / f"s{seed}.spra", "--density", "0.05", "--seed", seed)
    invoke("merge", tmp_path / "s1.spra", tmp_path / "s2.spra", "-o", tmp_path / "sum.spra", "--base", base,
           "--report", tmp_path / "report.json")  # fmt: skip
    report = json.loads((tmp_path / "report.json").read_text())
    a, b = Adapter.load(tmp_path / "s1.spra"), Adapter.load(tmp_path / "s2.spra")
    expected_overlap = sum(
        np.intersect1d(a.deltas[n].indices().numpy(), b.deltas[n].indices().numpy()).size for n in a.deltas
    )
    assert report["overlap"] == expected_overlap > 0
    assert Adapter.load(tmp_path / "sum.spra").num_values == a.num_values + b.num_values - expected_overlap
    (tmp_path / "recipe.yaml").write_text(
        f"merge_method: linear\nbase_model: {base}\nmodels:\n"
        "  - model: s1.spra\n    parameters: {weight: 0.5}\n  - model: s2.spra\n    parameters: {weight: 2.0}\n"
    )
    invoke("merge", "--recipe", tmp_path / "recipe.yaml", "-o", tmp_path / "linear.spra")
    assert Adapter.load(tmp_path / "linear.spra").provenance["merge_method"] in ("weighted", "linear")
