"""Hostile and wrong inputs found by an adversarial campaign against the CLI, one test per finding.

Memory safety (every index bounded before a compiled kernel reads it; every declared shape bounded
before any work), silent wrong results (odd shard names, a tensor stored twice, dense tensors of
another shape, a wrong base), and errors that must stay one line (surrogates, NaN, control
characters in names).
"""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from spra_tools import ops
from spra_tools.adapter import Adapter, TensorDelta
from spra_tools.checkpoint import INDEX, open_checkpoint
from spra_tools.errors import FormatError, SpraError
from spra_tools.fsutil import atomic_path
from spra_tools.support import SeededSupport

V0 = "model.layers.0.self_attn.v_proj.weight"


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("spra-tools: error: "), stderr
    assert "Traceback" not in stderr and "\x1b" not in stderr
    return lines[0]


def _delta(name: str, shape, density=0.05, seed=3) -> TensorDelta:
    support = SeededSupport(seed, name, math.prod(shape), density)
    values = torch.full((support.count,), 0.01, dtype=torch.bfloat16)
    return TensorDelta(name, tuple(shape), torch.bfloat16, support, values, {"BF16": "0123456789abcdef"})


def _write_edited(src, path, edit):
    shutil.copy(src, path)
    _edit_document(path, edit)
    return path


def _edit_document(path, edit) -> None:
    """Rewrite the adapter document of the .spra file at `path` in place (`edit(doc_text) -> text`)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["spra"] = edit(header["__metadata__"]["spra"])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


# ---------------------------------------------------------------------------------------------
# Memory safety
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("bad", [4096, -1, 1 << 40], ids=["one-past", "negative", "huge"])
def test_kernel_entries_refuse_out_of_bounds_indices(backend, bad, monkeypatch):
    monkeypatch.setenv("SPRA_TOOLS_BACKEND", backend)
    weight = torch.randn(64, 64).to(torch.bfloat16)
    idx = torch.tensor([0, 5, bad], dtype=torch.int64)
    values = torch.ones(3, dtype=torch.bfloat16)
    before = weight.clone()
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4096\)"):
        ops.gather(weight, idx)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4096\)"):
        ops.scatter_apply(weight, idx, values)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4096\)"):
        ops.restore(weight, idx, values)
    assert torch.equal(weight, before)


def test_reseed_refuses_an_adapter_of_other_shapes(tiny_llama, tmp_path, call_cli):
    src = tmp_path / "wide.spra"
    Adapter({V0: _delta(V0, (64, 128))}, base={"name": "x"}).save(src)
    r = call_cli("reseed", src, "-o", tmp_path / "out.spra", "--seed", "5", "--base", tiny_llama)
    assert r.rc == 1 and "in the base, [64, 128] in the adapter" in one_error_line(r.stderr)
    assert not (tmp_path / "out.spra").exists()


@pytest.mark.parametrize("shape", [[1 << 47], [1 << 37], [1 << 20, 1 << 17]])
def test_a_tiny_file_cannot_declare_a_huge_tensor(tmp_path, call_cli, shape):
    """A few-KB file declaring [2**47] at density 1e-12 would make `info --indices`, compare and
    reseed regenerate 2**31 blocks: refused by the reader, before any work."""
    path = tmp_path / "huge.spra"
    Adapter({"w": _delta("w", (1 << 20,), density=1e-5)}).save(path)
    numel = math.prod(shape)
    count = math.floor(1e-12 * numel) if numel > 1 << 36 else 0
    _edit_document(
        path,
        lambda t: (
            t.replace('"shape":[1048576]', f'"shape":{json.dumps(shape)}')
            .replace('"count":10', f'"count":{count}')
            .replace('"density":1e-05', '"density":1e-12')
        ),
    )
    with pytest.raises(FormatError, match=r"more than 2\*\*36 elements"):
        Adapter.load(path)
    r = call_cli("info", path, "--indices", "w")
    assert r.rc == 1 and "more than 2**36 elements" in one_error_line(r.stderr)


def test_a_file_cannot_declare_too_many_elements_in_all(tmp_path):
    path = tmp_path / "many.spra"
    deltas = {f"w{i}": _delta(f"w{i}", (1 << 16,), density=1e-4) for i in range(20)}
    Adapter(deltas).save(path)
    _edit_document(path, lambda t: t.replace('"shape":[65536]', f'"shape":[{1 << 36}]').replace("0.0001", "1e-10"))
    with pytest.raises(FormatError, match=r"more than 2\*\*40 elements in all"):
        Adapter.load(path)


# ---------------------------------------------------------------------------------------------
# Silent wrong results
# ---------------------------------------------------------------------------------------------


def _tensors(directory) -> dict[str, torch.Tensor]:
    index = json.loads((directory / INDEX).read_text())
    out = {}
    for name, shard in index["weight_map"].items():
        out[name] = load_file(directory / shard)[name]
    return out


def test_shards_not_named_safetensors_are_written_edited(tiny_llama, seeded_adapter, tmp_path, call_cli):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    index = json.loads((base / INDEX).read_text())
    renames = {s: f"weights-part{i}" for i, s in enumerate(sorted(set(index["weight_map"].values())))}
    for old, new in renames.items():
        (base / old).rename(base / new)
    index["weight_map"] = {n: renames[s] for n, s in index["weight_map"].items()}
    (base / INDEX).write_text(json.dumps(index))
    assert call_cli("apply", tiny_llama, seeded_adapter, "-o", tmp_path / "expected").rc == 0
    r = call_cli("apply", base, seeded_adapter, "-o", tmp_path / "out")
    assert r.rc == 0, r.stderr
    got, expected, original = _tensors(tmp_path / "out"), _tensors(tmp_path / "expected"), _tensors(base)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in got)
    assert not torch.equal(got[V0], original[V0])


def test_a_tensor_in_two_shards_is_read_where_the_index_says(tiny_llama, tmp_path, call_cli):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    index = json.loads((base / INDEX).read_text())
    home = index["weight_map"][V0]
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != home)
    stray = load_file(base / other)
    stray[V0] = torch.randn(64, 64).to(torch.bfloat16)  # a stale copy that the index does not name
    save_file(stray, base / other, metadata={"format": "pt"})
    indexed = load_file(base / home)[V0]
    assert torch.equal(open_checkpoint(base).read(V0), indexed)

    adapter = tmp_path / "a.spra"
    assert call_cli("create", base, "-o", adapter, "--density", "0.05", "--seed", "1").rc == 0
    r = call_cli("verify", base, adapter)
    assert r.rc == 0, r.stdout + r.stderr
    a = Adapter.load(adapter)
    for d in a.deltas.values():
        d.values = torch.full_like(d.values, 0.5)
    a.save(adapter, overwrite=True)
    assert call_cli("apply", base, adapter, "-o", tmp_path / "out").rc == 0
    written = _tensors(tmp_path / "out")[V0]
    idx = a.deltas[V0].indices()
    assert torch.equal(written.reshape(-1)[idx], (indexed.reshape(-1)[idx].float() + 0.5).to(torch.bfloat16))


def test_reseed_with_a_wrong_base_does_not_launder_fingerprints(tiny_llama, seeded_adapter, tmp_path, call_cli):
    wrong = tmp_path / "wrong"
    assert call_cli("apply", tiny_llama, seeded_adapter, "-o", wrong).rc == 0  # differs at the support
    r = call_cli("reseed", seeded_adapter, "-o", tmp_path / "b.spra", "--seed", "5", "--base", wrong)
    assert r.rc == 1 and "fingerprint mismatch" in one_error_line(r.stderr)
    assert not (tmp_path / "b.spra").exists()


@pytest.mark.parametrize("command", ["verify", "apply"])
def test_a_dense_tensor_of_another_shape_is_refused(tiny_llama, seeded_adapter, tmp_path, call_cli, command):
    a = Adapter.load(seeded_adapter)
    a.dense["model.norm.weight"] = torch.ones(3, dtype=torch.bfloat16)
    path = tmp_path / "dense.spra"
    a.save(path)
    args = [command, tiny_llama, path] + (["-o", tmp_path / "out"] if command == "apply" else [])
    r = call_cli(*args)
    assert r.rc == 1
    assert "dense shape [3] cannot replace the base's [64]" in (r.stdout + r.stderr)
    assert len([x for x in r.stderr.splitlines() if x.strip()]) == 1
    assert not (tmp_path / "out").exists()


def test_a_dense_tensor_may_add_rows(tiny_llama, seeded_adapter, tmp_path, call_cli):
    a = Adapter.load(seeded_adapter)
    embed = open_checkpoint(tiny_llama).read("model.embed_tokens.weight")
    a.dense["model.embed_tokens.weight"] = torch.cat([embed, embed[:2]])  # two added tokens
    path = tmp_path / "rows.spra"
    a.save(path)
    r = call_cli("verify", tiny_llama, path)
    assert r.rc == 0, r.stdout + r.stderr


@pytest.mark.parametrize("command", ["merge", "diff"])
def test_an_unwritable_report_is_refused_before_the_output(tiny_llama, seeded_adapter, tmp_path, call_cli, command):
    out = tmp_path / "out.spra"
    inputs = [seeded_adapter, seeded_adapter] if command == "merge" else [tiny_llama, tiny_llama]
    r = call_cli(command, *inputs, "-o", out, "--report", "/nonexistent/r.json")
    assert r.rc == 1 and "/nonexistent: output directory does not exist" in one_error_line(r.stderr)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# One line, not a traceback
# ---------------------------------------------------------------------------------------------


HOSTILE_DOCUMENTS = {  # edit of the document text, the error, the command that meets it
    "surrogate-name": (lambda t: t.replace(f'"name":"{V0}"', '"name":"\\udc80x"', 1), "lone surrogate", "info"),
    "text-numel": (lambda t: re.sub(r'"numel":\d+', '"numel":"many"', t, count=1), "base 'numel' must be", "export"),
    "nan-numel": (lambda t: re.sub(r'"numel":\d+', '"numel":NaN', t, count=1), "NaN is not a JSON number", "compare"),
    "duplicate-key": (lambda t: t.replace('"base":{', '"base":{"numel":5,', 1), "duplicate key 'numel'", "reseed"),
    "inf-anywhere": (lambda t: t.replace('"task":{', '"task":{"x":Infinity,', 1), "Infinity is not a JSON", "merge"),
    "surrogate-provenance": (
        lambda t: t.replace('"provenance":{', '"provenance":{"\\ud800":1,', 1),
        "lone surrogate",
        "convert",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", HOSTILE_DOCUMENTS)
def test_hostile_document_values_are_refused_in_one_line(seeded_adapter, tmp_path, call_cli, case):
    edit, message, command = HOSTILE_DOCUMENTS[case]
    with pytest.raises(FormatError, match=re.escape(message)):
        Adapter.load(_write_edited(seeded_adapter, tmp_path / "direct.spra", edit))
    path = tmp_path / "bad.spra"
    shutil.copy(seeded_adapter, path)
    _edit_document(path, edit)
    out = tmp_path / "out"
    args = {
        "info": ["info", path],
        "export": ["export", path, "-o", out],
        "compare": ["compare", path, seeded_adapter],
        "reseed": ["reseed", path, "-o", out, "--seed", "1234"],
        "merge": ["merge", path, seeded_adapter, "-o", out],
        "convert": ["convert", path, "-o", out, "--to", "peft-sparta"],
    }[command]
    r = call_cli(*args)
    assert r.rc == 1 and message in one_error_line(r.stderr)
    assert not out.exists()


@pytest.mark.parametrize("density", ["0", "2", "nan", "-1"])
def test_diff_density_out_of_range_is_one_line(tiny_llama, tmp_path, call_cli, density):
    r = call_cli("diff", tiny_llama, tiny_llama, "-o", tmp_path / "d.spra", "--density", density)
    assert r.rc != 0 and "density must be in (0, 1]" in r.stderr and "Traceback" not in r.stderr


def test_train_seed_overflow_is_one_line(tiny_llama, tmp_path, call_cli):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b"}\n')
    r = call_cli("train", tiny_llama, "--data", data, "-o", tmp_path / "t.spra", "--seed", "20000000000000000000000")
    assert r.rc != 0 and "--seed must be an integer in [0, 2**64)" in r.stderr and "Traceback" not in r.stderr


def test_reseed_against_a_base_lacking_the_tensor_is_one_line(tiny_llama, tmp_path, call_cli):
    src = tmp_path / "a.spra"
    Adapter({"not.in.base": _delta("not.in.base", (64, 64))}).save(src)
    r = call_cli("reseed", src, "-o", tmp_path / "b.spra", "--seed", "5", "--base", tiny_llama)
    assert r.rc == 1 and "tensor 'not.in.base': not in the base" in one_error_line(r.stderr)


def test_stack_shape_mismatch_is_one_line(tiny_llama, seeded_adapter, tmp_path, call_cli):
    src = tmp_path / "wide.spra"
    Adapter({V0: _delta(V0, (64, 128))}).save(src)
    r = call_cli("stack", tiny_llama, seeded_adapter, src, "-o", tmp_path / "s.spra")
    assert r.rc == 1 and "in the base, [64, 128] in the adapter" in one_error_line(r.stderr)


def test_names_are_escaped_in_everything_printed(tiny_llama, seeded_adapter, tmp_path, call_cli):
    evil = tmp_path / "evil\n\x1b[31mname.spra"
    name = "w\x1b]0;title\x07\nnext"
    Adapter({name: _delta(name, (64, 64))}, base={"name": "b\x1b[2J"}).save(evil)
    r = call_cli("info", evil)
    assert r.rc == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "w\\x1b]0;title\\x07\\nnext" in r.stdout and "evil\\n\\x1b[31mname.spra" in r.stdout
    r = call_cli("verify", tiny_llama, evil)
    assert "\x1b" not in r.stdout + r.stderr
    assert "evil\\n\\x1b[31mname.spra" in one_error_line(r.stderr)
    r = call_cli("info", tmp_path / "missing\n\x1b[31m.spra")
    assert "missing\\n\\x1b[31m.spra" in one_error_line(r.stderr)


def test_verify_mismatch_is_one_error_line_and_a_report(tiny_llama, seeded_adapter, tmp_path, call_cli):
    wrong = tmp_path / "wrong"
    assert call_cli("apply", tiny_llama, seeded_adapter, "-o", wrong).rc == 0
    r = call_cli("verify", wrong, seeded_adapter)
    assert r.rc == 1
    line = one_error_line(r.stderr)
    assert line.endswith(f"does not match {wrong} (4 of 4 tensors differ)"), line
    assert len(r.stdout.splitlines()) == 4 and all("fingerprint mismatch" in x for x in r.stdout.splitlines())


def test_merge_of_nonfinite_values_names_no_missing_flag(seeded_adapter, tmp_path, call_cli):
    a = Adapter.load(seeded_adapter)
    next(iter(a.deltas.values())).values[0] = float("nan")
    path = tmp_path / "nan.spra"
    a.save(path, allow_nonfinite=True)
    r = call_cli("merge", path, seeded_adapter, "-o", tmp_path / "m.spra")
    line = one_error_line(r.stderr)
    assert r.rc == 1 and "NaN or Inf" in line and "--allow-nonfinite" not in line


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_names_the_output(tmp_path, code):
    out = tmp_path / "out.spra"
    with pytest.raises(SpraError) as e:
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"x")
            raise OSError(code, "No space left on device", "/some/input.spra")
    assert e.value.path == str(out) and "No space left" in e.value.message
    assert list(tmp_path.iterdir()) == []


def test_an_error_in_the_temporary_names_the_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SpraError) as e:
        with atomic_path(out, directory=True) as tmp:
            open(tmp / "missing" / "x", "w")
    assert e.value.path == str(out)


def test_an_input_error_still_names_the_input(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        with atomic_path(tmp_path / "out"):
            open(tmp_path / "input.spra")
    assert e.value.filename == str(tmp_path / "input.spra")


def test_format_writer_refuses_what_the_reader_refuses(tmp_path):
    with pytest.raises(FormatError, match=r"more than 2\*\*36"):
        Adapter({"w": _delta("w", (1 << 37,), density=1e-9)}).save(tmp_path / "x.spra")
    np.testing.assert_equal(list(tmp_path.iterdir()), [])


def test_the_replacement_rule_for_dense_tensors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"score.weight": torch.zeros(2, 8), "score.bias": torch.zeros(2), "norm.weight": torch.zeros(8)}, path)
    ckpt = open_checkpoint(path)

    def why(**shapes):
        shapes = {k.replace("_", "."): v for k, v in shapes.items()}
        return {n: ckpt.replacement_problem(n, shapes) for n in shapes}

    assert why(score_weight=(5, 8), score_bias=(5,)) == {"score.weight": None, "score.bias": None}  # new labels
    assert why(norm_weight=(8,), new_head=(3, 3)) == {"norm.weight": None, "new.head": None}
    assert why(norm_weight=(3,))["norm.weight"] == "dense shape [3] cannot replace the base's [8]"
    assert why(score_bias=(5,))["score.bias"] is not None  # a bias changes only with its weight's rows
    assert why(score_weight=(8, 2))["score.weight"] is not None
