"""Where an output may go, and how it gets there (fsutil.check_output / atomic_path).

Every command that writes refuses an output that is an input, holds one or lies inside one — with
or without --overwrite, before any work, leaving every file as it was. Two runs racing to one new
output: the second fails cleanly. Temporaries of dead writers are removed on the next run, and an
--overwrite swap interrupted between its two renames is put back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from spra_tools import share
from spra_tools.errors import SpraError
from spra_tools.fsutil import atomic_path, check_output


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("spra-tools: error: "), stderr
    return lines[0]


@pytest.fixture
def world(tiny_llama, seeded_adapter, tmp_path):
    """A copy of the base, a tuned copy, a single-file base and an adapter, all under one parent."""
    root = tmp_path / "w"
    root.mkdir()
    base = root / "models" / "base"
    shutil.copytree(tiny_llama, base)
    single = root / "single"
    single.mkdir()
    first_shard = sorted(p for p in tiny_llama.iterdir() if p.suffix == ".safetensors")[0]
    shutil.copy(first_shard, single / "model.safetensors")
    adapter = root / "a.spra"
    shutil.copy(seeded_adapter, adapter)
    data = root / "data.jsonl"
    data.write_text('{"text": "hello world"}\n')
    return {"root": root, "base": base, "single": single, "adapter": adapter, "data": data}


# (command line template, what the output is): every writer, pointed at an input or its parent.
CASES = {
    "apply-parent-of-base": ["apply", "{base}", "{adapter}", "-o", "{models}"],
    "apply-onto-base": ["apply", "{base}", "{adapter}", "-o", "{base}"],
    "apply-onto-adapter": ["apply", "{base}", "{adapter}", "-o", "{adapter}"],
    "create-onto-base": ["create", "{base}", "-o", "{base}", "--seed", "1"],
    "create-onto-single-weights": ["create", "{single}", "-o", "{single}/model.safetensors", "--seed", "1"],
    "diff-onto-tuned": ["diff", "{base}", "{single}", "-o", "{single}"],
    "diff-report-onto-base": ["diff", "{base}", "{base}", "-o", "{root}/d.spra", "--report", "{base}/config.json"],
    "merge-onto-input": ["merge", "{adapter}", "{adapter}", "-o", "{adapter}"],
    "merge-parent-of-input": ["merge", "{adapter}", "{adapter}", "-o", "{root}"],
    "stack-onto-base": ["stack", "{base}", "{adapter}", "-o", "{base}"],
    "reseed-onto-input": ["reseed", "{adapter}", "-o", "{adapter}", "--seed", "7", "--base", "{base}"],
    "convert-parent-of-input": ["convert", "{adapter}", "-o", "{root}", "--to", "peft-sparta"],
    "export-parent-of-input": ["export", "{adapter}", "-o", "{root}"],
    "train-onto-base": ["train", "{base}", "--data", "{data}", "-o", "{base}", "--steps", "1"],
    "train-onto-data": ["train", "{base}", "--data", "{data}", "-o", "{data}", "--steps", "1"],
}


@pytest.mark.parametrize("case", CASES)
def test_no_output_is_or_holds_an_input(case, world, call_cli, snapshot):
    w = world
    paths = {k: str(v) for k, v in w.items()} | {"models": str(w["base"].parent)}
    args = [a.format(**paths) for a in CASES[case]] + ["--overwrite"]
    if args[0] == "create":
        args += ["--density", "0.01"]
    before = snapshot(w["root"])
    r = call_cli(*args)
    assert r.rc == 1, (r.stdout, r.stderr)
    line = one_error_line(r.stderr)
    assert "the input" in line and "choose another output" in line, line
    assert snapshot(w["root"]) == before


def test_output_dot_is_the_working_directory(world, call_cli, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("replaced")
    monkeypatch.chdir(out)
    r = call_cli("apply", world["base"], world["adapter"], "-o", ".", "--overwrite")
    monkeypatch.chdir(tmp_path)
    assert r.rc == 0, r.stderr
    assert (out / "config.json").is_file() and not (out / "old.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("directory", [False, True], ids=["file", "directory"])
def test_second_of_two_racing_writers_fails(tmp_path, directory):
    """Both runs pass the existence check at their start; the one that finishes second fails."""
    out = tmp_path / "out"

    def write(target, text):
        (target / "x" if directory else target).write_text(text)

    second = atomic_path(out, directory=directory)
    write(second.__enter__(), "second")
    with atomic_path(out, directory=directory) as first:
        write(first, "first")
    with pytest.raises(SpraError, match="appeared while this run was writing"):
        second.__exit__(None, None, None)
    assert (out / "x" if directory else out).read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_dead_writers_are_removed(tmp_path):
    out = tmp_path / "merged"
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".merged.spra-tmp-{dead}-abc"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".merged.spra-tmp-{alive}-def"
    live.mkdir()
    other = tmp_path / f".other.spra-tmp-{dead}-abc"
    other.mkdir()
    check_output(out, overwrite=False)
    assert not stale.exists() and live.exists() and other.exists()


def test_interrupted_overwrite_swap_is_put_back(tmp_path, world, call_cli):
    """A crash between the two renames of --overwrite leaves the old output only under its hidden
    name: the next run towards that output puts it back (and then refuses to replace it unasked)."""
    out = tmp_path / "merged"
    old = tmp_path / f".merged.spra-old-{_dead_pid()}"
    old.mkdir()
    (old / "config.json").write_text("{}")
    r = call_cli("apply", world["base"], world["adapter"], "-o", out)
    assert r.rc == 1 and "output exists" in one_error_line(r.stderr)
    assert (out / "config.json").read_text() == "{}" and not old.exists()


def test_swap_leftover_beside_a_complete_output_is_removed(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "new").write_text("new")
    old = tmp_path / f".merged.spra-old-{_dead_pid()}"
    old.mkdir()
    check_output(out, overwrite=True)
    assert not old.exists() and (out / "new").read_text() == "new"


@pytest.mark.parametrize(
    "name", ["../../x/escaped.txt", "a/../../b", "/etc/passwd", "C:x", "a\\..\\b", "a//b", "x\n.spra", ""]
)
def test_pull_refuses_unsafe_hub_file_names(name):
    with pytest.raises(SpraError, match="not a safe relative path"):
        share._check_repo_file_name(name, "acme/x")


def test_pull_accepts_plain_names():
    for name in ["task.spra", "README.md", "sub/dir/file.json", ".gitattributes", "a..b"]:
        share._check_repo_file_name(name, "acme/x")
