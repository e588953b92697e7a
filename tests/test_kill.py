"""`kill -9` at random moments of apply, merge and train: the base never changes, the output is
absent or complete (never half-written), and the next run towards the same output leaves no
temporary behind (an interrupted --overwrite swap is put back).

Each run is a fork of this process (spra_tools and torch already imported: a run costs
milliseconds, not an interpreter start) running the CLI's entry point, killed with SIGKILL after a
random delay drawn from a seeded generator over the run's measured duration.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from spra_tools.adapter import Adapter
from spra_tools.fsutil import check_output
from spra_tools.testing import build_word_tokenizer

TRIALS = int(os.environ.get("SPRA_TOOLS_KILL_TRIALS", "5"))
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def _fork(argv: list) -> int:
    pid = os.fork()
    if pid == 0:  # the child: the CLI, as the console script runs it; never returns to pytest
        code = 1
        try:
            torch.set_num_threads(1)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            from spra_tools import cli

            sys.argv = ["spra-tools", *map(str, argv)]
            try:
                cli.main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        finally:
            os._exit(code)
    return pid


def _run(argv: list, timeout: float = 300) -> tuple[int, float]:
    """Run `argv` to completion in a fork: (exit code, seconds)."""
    t0 = time.perf_counter()
    pid = _fork(argv)
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.perf_counter() - t0
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"{argv[0]} did not finish in {timeout} s")


def _kill_at(argv: list, delay: float) -> None:
    pid = _fork(argv)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _leftovers(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}."))


def _campaign(snapshot, tmp_path, argv_for, inputs: list[Path], complete, seed: int) -> dict:
    """TRIALS kills of `argv_for(out)` (half of them with --overwrite over a complete output),
    each followed by the checks of the module docstring; returns counts for the message."""
    before = {p: snapshot(p) for p in inputs}
    reference = tmp_path / "reference"
    rc, seconds = _run(argv_for(reference))
    assert rc == 0 and complete(reference)
    rng = np.random.default_rng(seed)
    outcomes = {"absent": 0, "complete": 0}
    for trial in range(TRIALS):
        out = tmp_path / f"out{trial}"
        overwrite = trial % 2 == 1
        if overwrite:
            assert _run(argv_for(out))[0] == 0
        _kill_at(argv_for(out) + (["--overwrite"] if overwrite else []), float(rng.uniform(0, 1.2 * seconds)))
        check_output(out, overwrite=True)  # what the next run towards `out` does first
        assert _leftovers(tmp_path, out.name) == [], f"trial {trial}: temporaries left"
        if out.exists():
            assert complete(out), f"trial {trial}: a half-written output"
            outcomes["complete"] += 1
        else:
            assert not overwrite, f"trial {trial}: the overwritten output is lost"
            outcomes["absent"] += 1
    assert {p: snapshot(p) for p in inputs} == before, "an input changed"
    print(f"{argv_for(reference)[0]}: {TRIALS} kills over {seconds:.2f} s runs: {outcomes}")
    return outcomes


def test_kill_apply(tiny_llama, seeded_adapter, tmp_path, snapshot):
    expected = None

    def complete(out: Path) -> bool:
        nonlocal expected
        got = snapshot(out)
        expected = expected or got
        return got == expected

    _campaign(snapshot, tmp_path, lambda out: ["apply", tiny_llama, seeded_adapter, "-o", out],
              [tiny_llama, seeded_adapter], complete, seed=0)  # fmt: skip


def test_kill_merge(seeded_adapter, explicit_adapter, tmp_path, snapshot):
    def complete(out: Path) -> bool:
        return Adapter.load(out).num_values > 0

    _campaign(snapshot, tmp_path, lambda out: ["merge", seeded_adapter, explicit_adapter, "-o", out],
              [seeded_adapter, explicit_adapter], complete, seed=1)  # fmt: skip


def test_kill_train(tiny_llama, tmp_path, snapshot):
    base = tmp_path / "base"
    import shutil

    shutil.copytree(tiny_llama, base)
    build_word_tokenizer(["hello", "world", "sparse", "adapter"], base)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "hello world sparse adapter " * 3}) + "\n" for _ in range(16)))

    def argv_for(out: Path) -> list:
        return ["train", base, "--data", data, "-o", out, "--steps", "6", "--density", "0.05", "--device", "cpu",
                "--batch-size", "4", "--checkpoint-dir", out.with_name(out.name + "-ckpt"), "--checkpoint-every", "2"]  # fmt: skip

    def complete(out: Path) -> bool:
        return Adapter.load(out).provenance["steps"] == 6

    _campaign(snapshot, tmp_path, argv_for, [base, data], complete, seed=2)
