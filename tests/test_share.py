"""export / push / pull: the export directory's contents, and Hub round trips against a local stand-in.

No test touches the real Hub: `hub_standin.HubStandin` serves the endpoints huggingface_hub calls on
127.0.0.1. CLI runs are real subprocesses (huggingface_hub reads HF_ENDPOINT at import time);
library runs pass `endpoint=` and patch the few constants a subprocess would take from its env.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import yaml

from spra_tools import format as fmt
from spra_tools import share
from spra_tools.adapter import Adapter
from spra_tools.dtypes import bit_view
from spra_tools.errors import SpraError

sys.path.insert(0, str(Path(__file__).parent))
from hub_standin import TOKEN, HubStandin  # noqa: E402

FILES = {"adapter_config.json", "README.md"}


@pytest.fixture(scope="module")
def hub():
    server = HubStandin().start()
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub, tmp_path):
    """The environment that points a subprocess's huggingface_hub at the stand-in."""
    return {
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": TOKEN,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        "HF_HUB_DISABLE_XET": "1",  # hf_xet is installed; the stand-in speaks only the regular upload path
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": None,
    }


@pytest.fixture
def hub_lib(hub, tmp_path, monkeypatch):
    """In-process library calls against the stand-in: what the subprocess env sets, patched here."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return {"endpoint": hub.url, "token": TOKEN}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, body = card[4:].partition("\n---\n")
    assert body.strip(), "the card has a body"
    return yaml.safe_load(head)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("spra-tools: error: "), stderr
    return lines[0]


# -- export -------------------------------------------------------------------------------------


def test_export_writes_spra_config_and_card(seeded_adapter, tmp_path, call_cli):
    out = tmp_path / "export"
    r = call_cli("export", seeded_adapter, "-o", out, "--base", "acme/tiny-llama")
    assert r.rc == 0, r.stderr
    assert {p.name for p in out.iterdir()} == FILES | {seeded_adapter.name}
    assert r.stderr == ""  # a Hub id: nothing to warn about

    adapter = Adapter.load(seeded_adapter)
    shared = Adapter.load(out / seeded_adapter.name)
    assert same_tensors(shared, adapter) and shared.base == {**adapter.base, "name": "acme/tiny-llama"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config == {
        "library_name": "spra-tools",
        "format_version": fmt.VERSION,
        "scheme": fmt.sup.SCHEME,
        "base_model": "acme/tiny-llama",
        "base_revision": None,
        "method": "sparta",
        "seed": 1234,
        "density": 0.05,
        "targets": ["vo"],
        "num_values": adapter.num_values,
        "adapter_file": seeded_adapter.name,
    }

    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta == {
        "base_model": "acme/tiny-llama",
        "library_name": "spra-tools",
        "tags": ["spra-tools", "sparta", "sparse-adapter", "peft"],
    }
    for line in (
        "spra-tools pull REPO -o DIR",
        f"spra-tools apply BASE DIR/{seeded_adapter.name} -o merged/",
        f'spra_tools.load_model(BASE, "DIR/{seeded_adapter.name}")',
        "spra_tools.attach(model, ",
        f"| values | {adapter.num_values:,} |",
        '"seed": 1234',
    ):
        assert line in card


def test_export_explicit_local_base_and_license(explicit_adapter, tmp_path):
    with pytest.warns(UserWarning, match="local checkpoint with no Hub id"):
        out = share.export_adapter(explicit_adapter, tmp_path / "export", license="apache-2.0")
    adapter = Adapter.load(explicit_adapter)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["seed"] is None and config["density"] is None
    assert config["base_model"] is None  # the recorded base is a local path: no Hub id
    meta = front_matter((out / "README.md").read_text())
    assert "base_model" not in meta
    assert meta["license"] == "apache-2.0"
    shared = Adapter.load(out / explicit_adapter.name)
    assert same_tensors(shared, adapter) and shared.base["name"] == Path(adapter.base["name"]).name


def same_tensors(a: Adapter, b: Adapter) -> bool:
    return a.deltas.keys() == b.deltas.keys() and all(
        torch.equal(a.deltas[n].indices(), b.deltas[n].indices())
        and torch.equal(bit_view(a.deltas[n].values), bit_view(b.deltas[n].values))
        and a.deltas[n].fingerprint == b.deltas[n].fingerprint
        for n in a.deltas
    )


@pytest.mark.parametrize("given", ["none", "local", "hub"])
def test_export_shares_no_local_path(given, seeded_adapter, tiny_llama, tmp_path, call_cli, monkeypatch):
    """A trained adapter records its base and data files as the user typed them; none of those
    paths reaches the shared files (file names are kept), and a local base without a Hub id warns."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "dir").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    adapter = Adapter.load(seeded_adapter)
    adapter.provenance = {"method": "train", "config": {"base": str(tiny_llama), "data": "data/train.jsonl",
                          "eval_data": str(tmp_path / "data" / "train.jsonl"), "targets": ["vo"]}}  # fmt: skip
    adapter.save(tmp_path / "trained.spra")
    flags = {"none": [], "local": ["--base", "./local/dir"], "hub": ["--base", "acme/tiny-llama@v1"]}[given]
    r = call_cli("export", tmp_path / "trained.spra", "-o", tmp_path / "out", *flags)
    assert r.rc == 0, r.stderr
    out = tmp_path / "out"
    for f in out.iterdir():
        text = f.read_bytes()
        for local in (str(tmp_path), str(tiny_llama), "data/train.jsonl", "./local"):
            assert local.encode() not in text, (f.name, local)
    shared = Adapter.load(out / "trained.spra")
    assert shared.provenance["config"] == {"base": tiny_llama.name, "data": "train.jsonl",
                                           "eval_data": "train.jsonl", "targets": ["vo"]}  # fmt: skip
    config = json.loads((out / "adapter_config.json").read_text())
    meta = front_matter((out / "README.md").read_text())
    if given == "hub":
        assert r.stderr == "" and config["base_model"] == meta["base_model"] == "acme/tiny-llama"
        assert config["base_revision"] == "v1"
    else:
        (line,) = r.stderr.splitlines()
        assert line.startswith("spra-tools: warning: the base ") and "no Hub id" in line and "--base ORG/NAME" in line
        assert config["base_model"] is None and "base_model" not in meta
        assert shared.base["name"] == ("dir" if given == "local" else tiny_llama.name)


def test_a_base_in_the_hub_cache_is_named_by_its_hub_id(seeded_adapter, tmp_path):
    adapter = Adapter.load(seeded_adapter)
    adapter.base = {**adapter.base, "name": str(tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "0123abc")}
    adapter.save(tmp_path / "cached.spra")
    out = share.export_adapter(tmp_path / "cached.spra", tmp_path / "out")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["base_model"], config["base_revision"]) == ("acme/tiny", "0123abc")
    assert front_matter((out / "README.md").read_text())["base_model"] == "acme/tiny"


def test_export_refuses_existing_output(seeded_adapter, tmp_path, call_cli, snapshot):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    r = call_cli("export", seeded_adapter, "-o", out)
    assert r.rc == 1
    assert "output exists" in one_error_line(r.stderr)
    assert snapshot(tmp_path) == before
    assert call_cli("export", seeded_adapter, "-o", out, "--overwrite").rc == 0
    assert {p.name for p in out.iterdir()} == FILES | {seeded_adapter.name}


# -- push / pull --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["seeded", "explicit"])
def test_push_then_pull_round_trips(which, request, hub, hub_env, tmp_path, run_cli):
    spra = request.getfixturevalue(f"{which}_adapter")
    repo = f"acme/{which}-roundtrip"
    exported = share.export_adapter(spra, tmp_path / "export", base="acme/tiny-llama")
    # A .spra file is exported on the fly; a directory goes up as it is. Both give the same repo.
    source = ["push", spra, repo, "--base", "acme/tiny-llama"] if which == "seeded" else ["push", exported, repo]
    r = run_cli(*source, env=hub_env)
    assert r.rc == 0, r.stderr
    assert f"/{repo}/commit/" in r.stdout

    out = tmp_path / "pulled"
    r = run_cli("pull", repo, "-o", out, env=hub_env)
    assert r.rc == 0, r.stderr
    assert r.stderr == ""  # no progress bars off a terminal
    for name in FILES | {spra.name}:
        assert (out / name).read_bytes() == (exported / name).read_bytes(), name
    assert same_tensors(Adapter.load(out / spra.name), Adapter.load(spra))
    assert not (out / ".cache").exists()


def test_push_to_branch_and_pull_revision(seeded_adapter, hub, hub_lib, tmp_path):
    repo = "acme/branched"
    url = share.push(seeded_adapter, repo, revision="dev", base="acme/tiny-llama", **hub_lib)
    assert url.startswith(f"{hub.url}/{repo}/commit/")
    assert seeded_adapter.name in hub.files(repo, "dev")
    assert seeded_adapter.name not in hub.files(repo, "main")  # main still holds only the initial commit

    out = share.pull(repo, tmp_path / "dev", revision="dev", **hub_lib)
    assert same_tensors(Adapter.load(out / seeded_adapter.name), Adapter.load(seeded_adapter))

    with pytest.raises(share.SpraError, match="expected exactly one .spra file, found no .spra file"):
        share.pull(repo, tmp_path / "main", **hub_lib)
    with pytest.raises(share.SpraError, match="no revision 'nope'"):
        share.pull(repo, tmp_path / "nope", revision="nope", **hub_lib)
    assert not (tmp_path / "main").exists() and not (tmp_path / "nope").exists()
    # Pushing again to an existing repo and branch is fine (create_repo / create_branch exist_ok).
    share.push(seeded_adapter, repo, revision="dev", base="acme/tiny-llama", **hub_lib)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "case, env, expected",
    [
        ("missing", {}, "acme/missing: no such repository on the Hub"),
        ("token", {"HF_TOKEN": "hf_wrong"}, "check your token: huggingface-cli login or HF_TOKEN"),
        ("offline", {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        ("unreachable", {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}, "cannot be reached"),
    ],
)
def test_pull_failures_are_one_line(case, env, expected, seeded_adapter, hub, hub_env, hub_lib, tmp_path, run_cli):
    repo = "acme/missing" if case == "missing" else "acme/for-errors"
    if case != "missing" and repo not in hub.repos:
        share.push(seeded_adapter, repo, base="acme/tiny-llama", **hub_lib)
    r = run_cli("pull", repo, "-o", tmp_path / "out", env={**hub_env, **env})
    assert r.rc == 1
    line = one_error_line(r.stderr)
    assert repo in line and expected in line, line
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("hf-")] == []


def test_push_with_wrong_token_is_one_line(seeded_adapter, hub, hub_env, run_cli):
    r = run_cli("push", seeded_adapter, "acme/refused", env={**hub_env, "HF_TOKEN": "hf_wrong"})
    assert r.rc == 1
    assert "acme/refused: the Hub refused access (401): check your token" in one_error_line(r.stderr)
    assert "acme/refused" not in hub.repos


def test_pull_refuses_existing_output(tmp_path, call_cli, snapshot):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    r = call_cli("pull", "acme/anything", "-o", out)
    assert r.rc == 1
    assert "output exists (use --overwrite" in one_error_line(r.stderr)
    assert snapshot(tmp_path) == before


def test_pull_of_corrupt_adapter_leaves_nothing(seeded_adapter, hub, hub_env, hub_lib, tmp_path, run_cli):
    repo = "acme/corrupt"
    share.push(seeded_adapter, repo, base="acme/tiny-llama", **hub_lib)
    data = seeded_adapter.read_bytes()
    hub.replace_file(repo, seeded_adapter.name, data[: len(data) // 2])
    dest = tmp_path / "dest"
    dest.mkdir()
    r = run_cli("pull", repo, "-o", dest / "out", env=hub_env)
    assert r.rc == 1
    line = one_error_line(r.stderr)
    assert f"{repo}: downloaded {seeded_adapter.name} is not a valid adapter" in line, line
    assert list(dest.iterdir()) == []  # neither the output nor a temporary


@pytest.mark.parametrize("name", ["../../x/escaped.txt", "/tmp/abs.txt"])
def test_pull_refuses_a_repo_file_name_outside_the_output(name, seeded_adapter, hub, hub_lib, tmp_path):
    """The Hub's names are checked before anything is downloaded, whatever huggingface_hub checks."""
    repo = "acme/traversal" + str(abs(hash(name)))
    share.push(seeded_adapter, repo, base="acme/tiny-llama", **hub_lib)
    hub.replace_file(repo, name, b"escaped")
    dest = tmp_path / "a" / "b"
    dest.mkdir(parents=True)
    with pytest.raises(SpraError, match="not a safe relative path"):
        share.pull(repo, dest / "out", **hub_lib)
    assert list(dest.iterdir()) == [] and not (tmp_path / "x").exists() and not os.path.exists("/tmp/abs.txt")
