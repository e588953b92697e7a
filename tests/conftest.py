"""Shared fixtures: tiny local checkpoints, valid adapters, CLI runners and directory snapshots.

Everything is built locally (no network) once per session:

* ``tiny_llama``      — a random Llama (hidden 64, 2 layers, seed 0) in bf16, sharded at 100KB;
* ``tiny_fp32_file``  — the same architecture and seed in fp32, as one ``model.safetensors`` file
  (the fixture is the file's path, a valid single-file base);
* ``seeded_adapter``  — a seeded V/O adapter of ``tiny_llama`` with small random values;
* ``explicit_adapter`` — the explicit (Elias-Fano) adapter that ``spra-tools diff`` extracts from
  ``tiny_llama`` and ``tiny_llama`` + ``seeded_adapter``.

``run_cli`` runs ``python -m spra_tools ...`` as a real subprocess; ``call_cli`` runs the same
entry point (`spra_tools.cli.main`, with its error handling) in-process, inside click's
CliRunner isolation, and is much faster. Both return ``CliResult(rc, stdout, stderr)``, which
unpacks as a tuple. ``snapshot(path)`` maps every file under `path` (relative path) to its
sha256 and every directory to ``"<dir>"``, so comparing two snapshots proves nothing changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from spra_tools.testing import build_tiny_model

REPO = Path(__file__).resolve().parents[1]


class CliResult(NamedTuple):
    rc: int
    stdout: str
    stderr: str


def _clean_env(env: dict[str, str | None] | None) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("SPRA_TOOLS_DEBUG", "SPRA_TOOLS_BACKEND", "SPRA_BACKEND")}
    out["HF_HUB_OFFLINE"] = "1"
    for key, value in (env or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def run_cli_subprocess(*args, env: dict[str, str | None] | None = None, cwd=None, timeout: float = 120) -> CliResult:
    """``python -m spra_tools ARGS`` in a fresh interpreter: the real exit code and streams."""
    proc = subprocess.run(
        [sys.executable, "-m", "spra_tools", *map(str, args)],
        capture_output=True,
        text=True,
        env=_clean_env(env),
        cwd=cwd or REPO,
        timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def call_cli_in_process(*args, env: dict[str, str | None] | None = None) -> CliResult:
    """`spra_tools.cli.main` in this interpreter, as the console script would run it.

    An exception escaping `main` is printed as the interpreter would (a traceback, exit code 1),
    so a bug shows up exactly as it would in a terminal.
    """
    from click.testing import CliRunner

    from spra_tools import cli as cli_module

    overrides: dict[str, str | None] = {
        "SPRA_TOOLS_DEBUG": None,
        "SPRA_TOOLS_BACKEND": None,
        "SPRA_BACKEND": None,
        "HF_HUB_OFFLINE": "1",
    }
    overrides.update(env or {})
    saved_argv, saved_debug = sys.argv, cli_module._DEBUG
    with CliRunner().isolation(env=overrides) as (out, err, _):
        sys.argv = ["spra-tools", *map(str, args)]
        # `--debug` flips a module global; never let one call leak into the next.
        cli_module._DEBUG = os.environ.get("SPRA_TOOLS_DEBUG") == "1"
        try:
            cli_module.main()
            rc = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                rc = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                rc = 1
        except BaseException:  # noqa: BLE001 - mimic the interpreter's top level
            traceback.print_exc(file=sys.stderr)
            rc = 1
        finally:
            sys.argv, cli_module._DEBUG = saved_argv, saved_debug
            sys.stdout.flush()
            sys.stderr.flush()
        stdout = out.getvalue().decode("utf-8", "replace")
        stderr = err.getvalue().decode("utf-8", "replace")
    return CliResult(rc, stdout, stderr)


def snapshot_tree(path: str | os.PathLike) -> dict[str, str]:
    """Relative path -> sha256 of every file under `path` ("<dir>" for directories).

    A single file gives ``{"": sha}``; a missing path gives ``{}``.
    """
    root = Path(path)
    if root.is_file():
        return {"": hashlib.sha256(root.read_bytes()).hexdigest()}
    if not root.is_dir():
        return {}
    result = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        result[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return result


@pytest.fixture(scope="session")
def run_cli():
    """Run the CLI as a real subprocess: ``run_cli(*args, env=None) -> CliResult(rc, stdout, stderr)``."""
    return run_cli_subprocess


@pytest.fixture(scope="session")
def call_cli():
    """Run `spra_tools.cli.main` in-process: ``call_cli(*args, env=None) -> CliResult(rc, stdout, stderr)``."""
    return call_cli_in_process


@pytest.fixture(scope="session")
def snapshot():
    """``snapshot(path) -> {relative path: sha256}``; equal snapshots mean nothing changed."""
    return snapshot_tree


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint directory: bf16, seed 0, sharded (several shards + index)."""
    path = tmp_path_factory.mktemp("tiny-llama") / "base"
    build_tiny_model("llama", path, dtype=torch.bfloat16, shard_size="100KB", seed=0)
    assert (path / "model.safetensors.index.json").is_file(), "fixture should be sharded"
    return path


@pytest.fixture(scope="session")
def tiny_fp32_file(tmp_path_factory) -> Path:
    """The same tiny Llama (seed 0) in fp32, as a single .safetensors file (the file's path)."""
    path = tmp_path_factory.mktemp("tiny-fp32") / "base"
    build_tiny_model("llama", path, dtype=torch.float32, seed=0)
    single = path / "model.safetensors"
    assert single.is_file()
    return single


@pytest.fixture(scope="session")
def seeded_adapter(tiny_llama, tmp_path_factory) -> Path:
    """A seeded V/O adapter (density 5 %, seed 1234) of `tiny_llama` with small random bf16 values."""
    from spra_tools.checkpoint import open_checkpoint
    from spra_tools.surgery import create_adapter

    adapter = create_adapter(open_checkpoint(tiny_llama), 0.05, 1234)
    gen = torch.Generator().manual_seed(0)
    for d in adapter.deltas.values():
        d.values = (torch.randn(d.count, generator=gen) * 0.05).to(d.values.dtype)
    adapter.exact = False
    path = tmp_path_factory.mktemp("seeded") / "seeded.spra"
    adapter.save(path)
    return path


@pytest.fixture(scope="session")
def explicit_adapter(tiny_llama, seeded_adapter, tmp_path_factory) -> Path:
    """An explicit (Elias-Fano) adapter of `tiny_llama`, extracted by ``spra-tools diff``."""
    root = tmp_path_factory.mktemp("explicit")
    tuned, path = root / "tuned", root / "explicit.spra"
    r = call_cli_in_process("apply", tiny_llama, seeded_adapter, "-o", tuned)
    assert r.rc == 0, r.stderr
    r = call_cli_in_process("diff", tiny_llama, tuned, "-o", path)
    assert r.rc == 0, r.stderr
    return path
