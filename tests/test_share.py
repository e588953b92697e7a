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
import yaml

from spra_tools import format as fmt
from spra_tools import share
from spra_tools.adapter import Adapter
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
    assert (out / seeded_adapter.name).read_bytes() == seeded_adapter.read_bytes()

    adapter = Adapter.load(seeded_adapter)
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
    out = share.export_adapter(explicit_adapter, tmp_path / "export", license="apache-2.0")
    adapter = Adapter.load(explicit_adapter)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["seed"] is None and config["density"] is None
    assert config["base_model"] == adapter.base["name"]  # the recorded (local) base
    meta = front_matter((out / "README.md").read_text())
    assert "base_model" not in meta  # a local path is no Hub id: the key is left out
    assert meta["license"] == "apache-2.0"
    assert (out / explicit_adapter.name).read_bytes() == explicit_adapter.read_bytes()


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
    assert (out / spra.name).read_bytes() == spra.read_bytes()
    assert not (out / ".cache").exists()


def test_push_to_branch_and_pull_revision(seeded_adapter, hub, hub_lib, tmp_path):
    repo = "acme/branched"
    url = share.push(seeded_adapter, repo, revision="dev", base="acme/tiny-llama", **hub_lib)
    assert url.startswith(f"{hub.url}/{repo}/commit/")
    assert seeded_adapter.name in hub.files(repo, "dev")
    assert seeded_adapter.name not in hub.files(repo, "main")  # main still holds only the initial commit

    out = share.pull(repo, tmp_path / "dev", revision="dev", **hub_lib)
    assert (out / seeded_adapter.name).read_bytes() == seeded_adapter.read_bytes()

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
