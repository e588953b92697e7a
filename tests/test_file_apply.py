"""`spra-tools apply` streams adapters into a copy of the base without torch: the same bytes as the
in-memory path (`surgery.apply_adapter` on the reference backend, which defines the result), the
same checks and errors, for every dtype, layout and adapter kind; and it does not import torch.

Each case runs with a chunk a few hundred bytes long and small copy jobs, so that tensors span
many chunks and the jobs are shared out between threads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spra_tools import checkpoint, file_apply
from spra_tools import format as fmt
from spra_tools.adapter import Adapter
from spra_tools.checkpoint import INDEX, open_checkpoint
from spra_tools.dtypes import DTYPE_NAMES, bit_view
from spra_tools.errors import MismatchError, SpraError
from spra_tools.file_apply import apply_files
from spra_tools.surgery import apply_adapter, create_adapter
from spra_tools.testing import build_tiny_model


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    for variable in ("SPRA_TOOLS_BACKEND", "SPRA_BACKEND"):  # naming a backend takes the in-memory path
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(checkpoint, "_STREAM_CHUNK", 700)  # not a multiple of 4 or 8: whole elements per chunk
    monkeypatch.setattr(checkpoint, "_COPY_JOB", 3000)


@pytest.fixture
def streamed_only(monkeypatch):
    """Fail if the apply leaves the stream for the in-memory path."""

    def refuse(*args):
        raise AssertionError("took the in-memory path")

    monkeypatch.setattr(file_apply, "_apply_in_memory", refuse)


def _adapter(base: Path, path: Path, density: float, seed: int, *, scale=0.05, values_dtype="BF16", targets=("all",)):
    """A seeded adapter of `base` with random values (a few of them large), saved at `path`."""
    adapter = create_adapter(open_checkpoint(base), density, seed, targets=targets, values_dtype=values_dtype)
    gen = torch.Generator().manual_seed(seed)
    for d in adapter.deltas.values():
        v = torch.randn(d.count, generator=gen) * scale
        v[::7] *= 300  # rounds differently from the small ones, in every dtype
        d.values = v.to(d.values.dtype)
    adapter.save(path)
    return path


def _reference(base, paths, out, monkeypatch, **kw) -> None:
    with monkeypatch.context() as m:
        m.setenv("SPRA_TOOLS_BACKEND", "reference")
        apply_adapter(open_checkpoint(base), [(str(p), Adapter.load(p)) for p in paths], out, **kw)


def _same(base, paths, tmp_path, monkeypatch, snapshot, suffix="", **kw):
    ours, ref = tmp_path / f"ours{suffix}", tmp_path / f"ref{suffix}"
    stats = apply_files(base, [str(p) for p in paths], ours, **kw)
    _reference(base, paths, ref, monkeypatch, **kw)
    assert snapshot(ours) == snapshot(ref)
    assert snapshot(ours) != snapshot(base)
    return stats


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("values_dtype", ["BF16", "F16", "F32"])
def test_sharded_bases_of_every_dtype(dtype, values_dtype, tmp_path, monkeypatch, snapshot, streamed_only):
    base = tmp_path / "base"
    build_tiny_model("llama", base, dtype=dtype, shard_size="60KB", seed=3)
    a = _adapter(base, tmp_path / "a.spra", 0.05, 11, values_dtype=values_dtype)
    stats = _same(base, [a], tmp_path, monkeypatch, snapshot, scale=0.7)
    assert stats["values"] == Adapter.load(a).num_values


def test_single_file_base_and_explicit_adapter(
    tiny_fp32_file, tiny_llama, explicit_adapter, tmp_path, monkeypatch, snapshot, streamed_only
):
    a = _adapter(tiny_fp32_file, tmp_path / "a.spra", 0.02, 5)
    _same(tiny_fp32_file, [a], tmp_path, monkeypatch, snapshot, suffix=".safetensors")
    assert isinstance(next(iter(Adapter.load(explicit_adapter).deltas.values())).support, fmt.sup.ExplicitSupport)
    _same(tiny_llama, [explicit_adapter], tmp_path, monkeypatch, snapshot, suffix="-explicit", scale=-1.5)


def test_shards_not_named_safetensors(tiny_llama, seeded_adapter, tmp_path, monkeypatch, snapshot, streamed_only):
    base = tmp_path / "base"
    base.mkdir()
    index = json.loads((tiny_llama / INDEX).read_text())
    renamed = {s: f"part{i}.bin-shard" for i, s in enumerate(dict.fromkeys(index["weight_map"].values()))}
    for p in tiny_llama.iterdir():
        (base / renamed.get(p.name, p.name)).write_bytes(p.read_bytes())
    index["weight_map"] = {t: renamed[s] for t, s in index["weight_map"].items()}
    (base / INDEX).write_text(json.dumps(index))
    _same(base, [seeded_adapter], tmp_path, monkeypatch, snapshot)
    assert sorted(p.name for p in (tmp_path / "ours").iterdir() if p.name.startswith("part")) == sorted(
        renamed.values()
    )


def test_chains_on_one_tensor(tiny_llama, seeded_adapter, tmp_path, monkeypatch, snapshot, streamed_only):
    """B fingerprints base + A (trained on it); C fingerprints the base: both chains apply."""
    first = tmp_path / "first"
    apply_files(tiny_llama, [str(seeded_adapter)], first)
    b = _adapter(first, tmp_path / "b.spra", 0.05, 1234, targets=("vo",))  # A's supports, on base + A
    c = _adapter(tiny_llama, tmp_path / "c.spra", 0.03, 99)
    _same(tiny_llama, [seeded_adapter, b, c], tmp_path, monkeypatch, snapshot)


def test_task_sets_the_written_config(tiny_llama, seeded_adapter, tmp_path, monkeypatch, snapshot, streamed_only):
    adapter = Adapter.load(seeded_adapter)
    adapter.task = {"architecture": "LlamaForSequenceClassification", "id2label": {"0": "no", "1": "yes"}}
    adapter.save(tmp_path / "task.spra")
    _same(tiny_llama, [tmp_path / "task.spra"], tmp_path, monkeypatch, snapshot)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["label2id"] == {"no": 0, "yes": 1}


def test_values_at_edges_of_each_dtype(tmp_path, monkeypatch, snapshot, streamed_only):
    """Subnormal weights and sums, rounding ties, the largest finite values, odd tensor offsets."""
    gen = torch.Generator().manual_seed(2)
    tensors = {"odd": torch.randint(0, 255, (3,), dtype=torch.uint8, generator=gen)}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        info = torch.finfo(dtype)
        w = torch.randn(30, 50, generator=gen)
        w.view(-1)[::5] *= info.tiny  # subnormal in fp32 arithmetic
        w.view(-1)[1::9] = info.max / 4
        tensors[f"{dtype}.weight"] = w.to(dtype)
    path = tmp_path / "base.safetensors"
    with open(path, "wb") as f:
        fmt.write_container(f, [(n, DTYPE_NAMES[t.dtype], bit_view(t).numpy()) for n, t in tensors.items()], None)
    adapter = create_adapter(open_checkpoint(path), 0.4, 8, targets=("all",), values_dtype="F32")
    for d in adapter.deltas.values():
        base = open_checkpoint(path).view(d.name).reshape(-1)[d.indices()].float()
        v = torch.randn(d.count, generator=gen) * torch.finfo(d.dtype).tiny
        v[::3] = base[::3] * (2.0 ** -torch.randint(8, 12, (v[::3].numel(),), generator=gen))  # near ties
        v[1::11] = base[1::11].abs().clamp(max=1) * 0.5
        d.values = v
    adapter.save(tmp_path / "a.spra")
    _same(path, [tmp_path / "a.spra"], tmp_path, monkeypatch, snapshot, suffix=".safetensors")


def test_results_that_are_not_finite_take_the_in_memory_path(tiny_llama, tmp_path, monkeypatch, snapshot):
    """An overflow is refused with today's message; allowed, it writes what the in-memory path writes."""
    adapter = create_adapter(open_checkpoint(tiny_llama), 0.05, 3)
    for d in adapter.deltas.values():
        d.values = torch.full((d.count,), 3e38).to(torch.bfloat16)
    adapter.save(tmp_path / "big.spra")
    with pytest.raises(SpraError, match="applying overflows BF16"):
        apply_files(tiny_llama, [str(tmp_path / "big.spra")], tmp_path / "out", scale=2.0)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["big.spra"]  # no temporary left
    _same(tiny_llama, [tmp_path / "big.spra"], tmp_path, monkeypatch, snapshot, scale=2.0, allow_nonfinite=True)


def test_adapters_with_dense_tensors_take_the_in_memory_path(
    tiny_llama, seeded_adapter, tmp_path, monkeypatch, snapshot
):
    adapter = Adapter.load(seeded_adapter)
    adapter.dense["lm_head.weight"] = torch.randn(256, 64).to(torch.bfloat16)
    adapter.dense["score.bias"] = torch.randn(3)
    adapter.save(tmp_path / "dense.spra")
    _same(tiny_llama, [tmp_path / "dense.spra"], tmp_path, monkeypatch, snapshot)


def test_bad_inputs_fail_before_any_output(tiny_llama, tiny_fp32_file, seeded_adapter, tmp_path, monkeypatch):
    out = tmp_path / "out"
    other = tmp_path / "other"
    build_tiny_model("llama", other, dtype=torch.bfloat16, seed=1)  # same names and shapes, other values
    with pytest.raises(MismatchError, match="fingerprint mismatch") as ours:
        apply_files(other, [str(seeded_adapter)], out)
    with pytest.raises(MismatchError) as ref:
        _reference(other, [seeded_adapter], out, monkeypatch)
    assert str(ours.value) == str(ref.value)
    with pytest.raises(MismatchError, match="dtype BF16 in the base, F32 in the adapter"):
        apply_files(tiny_llama, [str(_adapter(tiny_fp32_file.parent, tmp_path / "f.spra", 0.05, 1))], out)
    nan = Adapter.load(seeded_adapter)
    first = next(iter(nan.deltas.values()))
    first.values = first.values.clone()
    first.values[3] = float("nan")
    nan.save(tmp_path / "nan.spra", allow_nonfinite=True)
    with pytest.raises(SpraError, match="has NaN or Inf values"):
        apply_files(tiny_llama, [str(tmp_path / "nan.spra")], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.spra", "nan.spra", "other"]


def test_cli_apply_streams_without_importing_torch(tiny_llama, seeded_adapter, tmp_path, monkeypatch, snapshot):
    probe = (
        "import sys; from spra_tools.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    args = ["apply", str(tiny_llama), str(seeded_adapter), "-o", str(tmp_path / "cli")]
    proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _reference(tiny_llama, [seeded_adapter], tmp_path / "ref", monkeypatch)
    assert snapshot(tmp_path / "cli") == snapshot(tmp_path / "ref")


def test_stream_copies_through_a_buffer_where_the_kernel_cannot(
    tiny_llama, seeded_adapter, tmp_path, monkeypatch, snapshot
):
    """copy_file_range fails across some filesystems (EXDEV): the copy goes through the buffer."""

    def cross_device(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(checkpoint.os, "copy_file_range", cross_device)
    _same(tiny_llama, [seeded_adapter], tmp_path, monkeypatch, snapshot)
