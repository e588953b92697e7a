"""Hub ids resolve through huggingface_hub's real cache logic (offline here: a cache laid out by the test)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from spra_tools.testing import build_tiny_model


def _run(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "spra_tools", *map(str, args)], capture_output=True, text=True, env=env
    )


def test_hub_id_from_offline_cache(tmp_path):
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    build_tiny_model("llama", tmp_path / "src", shard_size="60KB")
    shutil.copytree(tmp_path / "src", repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    r = _run("create", "acme/tiny-llama", "-o", tmp_path / "a.spra", "--density", "0.1", "--seed", 1, env=env)
    assert r.returncode == 0, r.stderr
    r = _run("verify", "acme/tiny-llama@main", tmp_path / "a.spra", env=env)
    assert r.returncode == 0, r.stderr
    r = _run("apply", "acme/tiny-llama", tmp_path / "a.spra", "-o", tmp_path / "out", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "config.json").is_file()

    r = _run("verify", "acme/not-cached", tmp_path / "a.spra", env=env)
    assert r.returncode == 1
    assert r.stderr.strip() == "spra-tools: error: acme/not-cached: not in the local cache and HF_HUB_OFFLINE is set"
