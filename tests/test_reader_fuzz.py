"""Fuzzing the .spra reader: whatever the bytes, it returns a sane result or raises FormatError.

Starting from valid adapters (seeded and explicit, made from a real checkpoint, plus small
synthetic ones with F32/F16 values, an empty support and a dense tensor) we apply random byte
flips, truncations, insertions and deletions; random edits of the safetensors header (types,
negative and huge numbers, shapes like [2**40, 2**40], overlapping or out-of-range data_offsets,
duplicated, missing and extra tensors); and random edits of the adapter document (types, missing
and extra keys, huge counts, duplicate tensor names, bad supports).

The property (docs/FORMAT.md §8: every check before any allocation):

* `read_container` / `read_spra` either succeed or raise `spra_tools.errors.FormatError` —
  never another exception type (which the CLI would show as a traceback);
* a successful read is sane: tensors tile the data section exactly, every support is strictly
  increasing inside [0, numel) and has `count` elements, values have `count` elements;
* reading never allocates absurd memory: peak traced memory (tracemalloc, which numpy reports
  to) stays below 16 MiB for these few-KiB files, whatever shapes and counts they claim.

The campaign (`run_campaign`) goes one step further, with a seeded mutation loop rather than
hypothesis: bit flips (anywhere, or in the tensor data), truncations, rewritten header lengths and
JSON mutations of the header and the document (huge counts, NaN, wrong types, deep nesting,
duplicate keys, odd Unicode); each file goes through `Adapter.load` and, when it loads, through
every read command in process (info, info --json, info --indices, compare, verify), which must
exit 0 or print one error line. CI runs 150 cases; `SPRA_TOOLS_SLOW=1` runs
`SPRA_TOOLS_FUZZ_CASES` (default 20,000) and prints the counts.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spra_tools import format as fmt
from spra_tools import support as sup
from spra_tools.errors import FormatError

sys.path.insert(0, str(Path(__file__).parent))

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_PEAK = 16 << 20  # bytes of traced allocations while reading a few-KiB file
MAX_SEEDED_CHECK = 1 << 22  # regenerate seeded supports up to this numel for the sanity check


# ---------------------------------------------------------------------------------------------
# Valid starting points
# ---------------------------------------------------------------------------------------------


def _synthetic_adapters() -> dict[str, bytes]:
    """Small adapters written straight through format.write_spra (no torch, no checkpoint)."""
    rng = np.random.default_rng(0)
    fp = {"BF16": "0123456789abcdef"}
    fp32 = {"F32": "0123456789abcdef", "BF16": "fedcba9876543210", "F16": "00000000ffffffff"}
    seeded = sup.SeededSupport(5, "a.weight", 64 * 70, 0.01)
    explicit = sup.ExplicitSupport(1000, np.sort(rng.choice(1000, 37, replace=False)))
    dense_explicit = sup.ExplicitSupport(40, np.arange(0, 40, 2))
    empty = sup.ExplicitSupport(300, np.empty(0, dtype=np.int64))
    records = [
        fmt.TensorRecord(
            "a.weight", (64, 70), "BF16", seeded, rng.integers(0, 1 << 16, seeded.count, dtype=np.uint16), "BF16", fp
        ),
        fmt.TensorRecord("b.weight", (10, 100), "F32", explicit, rng.standard_normal(37).astype("<f4"), "F32", fp32),
        fmt.TensorRecord("c.weight", (40,), "BF16", dense_explicit, np.ones(20, dtype="<f2"), "F16", fp),
        fmt.TensorRecord("d.weight", (3, 100), "BF16", empty, np.empty(0, dtype=np.uint16), "BF16", fp),
    ]
    dense = [fmt.DenseRecord("score.weight", "F16", np.arange(12, dtype="<f2").reshape(3, 4))]
    out = {}
    for label, spra in {
        "synthetic-mixed": fmt.SpraFile(records, dense, {"name": "x"}, {"labels": ["a"]}, {"method": "test"}, False),
        "synthetic-empty": fmt.SpraFile([], [], {}, {}, {}, True),
    }.items():
        buf = io.BytesIO()
        fmt.write_spra(buf, spra)
        out[label] = buf.getvalue()
    return out


@pytest.fixture(scope="module")
def valid(seeded_adapter, explicit_adapter, tmp_path_factory) -> dict[str, bytes]:
    adapters = {
        "seeded": seeded_adapter.read_bytes(),
        "explicit": explicit_adapter.read_bytes(),
        **_synthetic_adapters(),
    }
    # Every starting point really is valid (and sane).
    scratch = tmp_path_factory.mktemp("valid")
    for label, data in adapters.items():
        path = scratch / f"{label}.spra"
        path.write_bytes(data)
        _check_sane(fmt.read_container(path), fmt.read_spra(path))
    return adapters


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    """One file, rewritten by every example (hypothesis and function-scoped tmp_path don't mix)."""
    return tmp_path_factory.mktemp("fuzz") / "fuzzed.spra"


# ---------------------------------------------------------------------------------------------
# The property
# ---------------------------------------------------------------------------------------------


def _check_sane(c: fmt.Container, s: fmt.SpraFile | None) -> None:
    infos = sorted(c.tensors.values(), key=lambda t: (t.begin, t.end))
    cursor = 8 + c.header_size
    for t in infos:
        assert t.begin == cursor and t.end >= t.begin
        assert t.numel * fmt.DTYPES[t.dtype][0] == t.nbytes
        cursor = t.end
    assert cursor == c.file_size
    if s is None:
        return
    names = [r.name for r in s.tensors]
    assert len(set(names)) == len(names)
    for r in s.tensors:
        numel = math.prod(r.shape)
        count = r.support.count
        assert 0 <= count <= numel <= fmt.MAX_TENSOR_NUMEL
        assert r.values.shape == (count,)
        assert r.values_dtype in fmt.FLOAT_DTYPES and r.dtype in fmt.FLOAT_DTYPES
        if isinstance(r.support, sup.SeededSupport):
            assert r.support.numel == numel
        # (seeded supports of huge tensors are not regenerated here: that is the generator's cost)
        idx = r.support.indices() if numel <= MAX_SEEDED_CHECK or isinstance(r.support, sup.ExplicitSupport) else None
        if idx is not None:
            assert idx.dtype == np.int64 and idx.shape == (count,)
            if count:
                assert idx[0] >= 0 and idx[-1] < numel and bool(np.all(np.diff(idx) > 0))
    for d in s.dense:
        assert d.dtype in fmt.FLOAT_DTYPES and d.array.ndim == len(c.tensors[fmt.DENSE + d.name].shape)


def _read(path: Path) -> tuple[str, fmt.Container | None, fmt.SpraFile | None]:
    try:
        container = fmt.read_container(path)
    except FormatError:
        return "refused", None, None
    try:
        return "ok", container, fmt.read_spra(path)
    except FormatError:
        return "container-only", container, None


def check_reader(path: Path, data: bytes) -> str:
    """Write `data` to `path`, read it, check the property; returns "ok", "container-only" or "refused"."""
    path.write_bytes(data)
    tracemalloc.start()
    try:
        outcome, container, spra = _read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_PEAK, f"reading a {len(data)}-byte file allocated {peak} bytes"
    if container is not None:
        _check_sane(container, spra)
    return outcome


# ---------------------------------------------------------------------------------------------
# Byte-level mutations
# ---------------------------------------------------------------------------------------------


@st.composite
def byte_mutations(draw, valid: dict[str, bytes]) -> bytes:
    label = draw(st.sampled_from(sorted(valid)))
    data = bytearray(valid[label])
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "flip-header", "truncate", "insert", "delete", "length"]))
        if not data:
            data += draw(st.binary(max_size=16))
            continue
        if op in ("flip", "flip-header"):
            hi = min(len(data), header_end) if op == "flip-header" else len(data)
            pos = draw(st.integers(0, max(0, hi - 1)))
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif op == "insert":
            pos = draw(st.integers(0, len(data)))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            pos = draw(st.integers(0, len(data) - 1))
            del data[pos : pos + draw(st.integers(1, 32))]
        else:  # rewrite the 8-byte header length
            n = draw(
                st.one_of(st.integers(0, 2**64 - 1), st.integers(max(0, header_end - 8 - 16), header_end - 8 + 16))
            )
            data[:8] = struct.pack("<Q", n)
    return bytes(data)


def test_byte_mutations(valid, target):
    @FUZZ
    @given(byte_mutations(valid))
    def run(data):
        check_reader(target, data)

    run()


# ---------------------------------------------------------------------------------------------
# Header (safetensors table) mutations
# ---------------------------------------------------------------------------------------------

HUGE = [2**31, 2**32, 2**40, 2**48, 2**53 + 1, 2**62 - 1, 2**62, 2**63, 2**64, 2**64 + 1, 2**100]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, *HUGE, *(-h for h in HUGE)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(list(fmt.DTYPES) + ["F32 ", "bf16", "", "F4"]),
)
containers = st.one_of(
    st.lists(st.one_of(scalars, st.sampled_from(HUGE)), max_size=9),
    st.dictionaries(st.text(max_size=6), scalars, max_size=3),
    st.sampled_from([[2**40, 2**40], [2**62, 2**62], [-1, 4], [0, 2**62], [1] * 9, [0.5], ["F32"], {"dtype": "F32"}]),
)


HEADER_OPS = ("field",) * 3 + ("offsets", "drop-key", "extra-key", "duplicate", "remove", "rename", "metadata", "body")


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict | str | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@st.composite
def header_mutations(draw, valid: dict[str, bytes], values) -> bytes:
    header, body = _split(valid[draw(st.sampled_from(sorted(valid)))])
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(HEADER_OPS))
        if not names and op not in ("metadata", "body"):
            op = "body"
        name = draw(st.sampled_from(names)) if names else None
        entry = header.get(name)
        if op == "field" and isinstance(entry, dict):
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(values)
        elif op == "offsets" and isinstance(entry, dict):
            # overlapping, reversed, out of range, or aligned with another tensor
            other = header.get(draw(st.sampled_from(names)))
            ob = (
                other["data_offsets"]
                if isinstance(other, dict) and isinstance(other.get("data_offsets"), list)
                else [0, 0]
            )
            choice = draw(st.sampled_from(["other", "shift", "reverse", "past-end", "huge"]))
            offsets = entry.get("data_offsets")
            valid_offsets = isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)
            b, e = offsets if valid_offsets else (0, 0)
            entry["data_offsets"] = {
                "other": list(ob),
                "shift": [b + draw(st.integers(-8, 8)), e + draw(st.integers(-8, 8))],
                "reverse": [e, b],
                "past-end": [b, len(body) + draw(st.integers(1, 64))],
                "huge": [draw(st.sampled_from(HUGE)), draw(st.sampled_from(HUGE))],
            }[choice]
        elif op == "drop-key" and isinstance(entry, dict) and entry:
            entry.pop(draw(st.sampled_from(sorted(entry))))
        elif op == "extra-key" and isinstance(entry, dict):
            entry[draw(st.text(max_size=6))] = draw(values)
        elif op == "duplicate":
            new = draw(st.text(min_size=1, max_size=12))
            header[new] = json.loads(json.dumps(entry))
            names.append(new)
        elif op == "remove":
            header.pop(name, None)
            names.remove(name)
        elif op == "rename" and name in header:
            new = draw(st.sampled_from([fmt.VALUES, fmt.LOW, fmt.HIGH, fmt.DENSE, ""])) + draw(st.text(max_size=8))
            header[new] = header.pop(name)
            names[names.index(name)] = new
        elif op == "metadata":
            header["__metadata__"] = draw(st.one_of(values, st.dictionaries(st.text(max_size=5), values, max_size=2)))
        elif op == "body":
            body = (
                body[: draw(st.integers(0, len(body)))] if draw(st.booleans()) else body + draw(st.binary(max_size=16))
            )
    text = json.dumps(header)
    if draw(st.integers(0, 9)) == 0 and names:  # a duplicate key, as raw JSON text
        dup = json.dumps(names[0])
        text = text[:-1] + (", " if len(header) else "") + f"{dup}: {json.dumps(header.get(names[0]))}" + "}"
    return _join(text, body)


@pytest.mark.parametrize("values", [scalars, containers], ids=["scalar-values", "container-values"])
def test_header_mutations(valid, target, values):
    @FUZZ
    @given(header_mutations(valid, values))
    def run(data):
        check_reader(target, data)

    run()


# ---------------------------------------------------------------------------------------------
# Document (the 'spra' metadata JSON) mutations
# ---------------------------------------------------------------------------------------------

TOP_KEYS = ["format", "version", "scheme", "exact", "base", "tensors", "task", "provenance"]
ENTRY_KEYS = ["name", "shape", "dtype", "count", "support", "fingerprint"]
SUPPORT_KEYS = ["kind", "seed", "density", "code"]
DOC_OPS = ("top", "top-drop", "top-extra", "entry", "entry-drop", "entry-extra", "support", "duplicate", "count")
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=6
)
special = st.sampled_from(
    [
        [2**40, 2**40],
        [2**24, 2**24],
        [2**62],
        [-1],
        [],
        [0],
        [1] * 9,
        2**62,
        2**63,
        -5,
        float("nan"),
        float("inf"),
        -0.0,
        1e-300,
        "explicit",
        "seeded",
        "elias-fano",
        {},
    ]
)


def _resize_values(header: dict, body: bytes, name: str, count: int) -> tuple[dict, bytes]:
    """Make the values tensor of `name` hold `count` elements (so the reader gets further)."""
    key = fmt.VALUES + name
    entry = header.get(key)
    if not (isinstance(entry, dict) and entry.get("dtype") in fmt.FLOAT_DTYPES and 0 <= count <= 4096):
        return header, body
    size = fmt.DTYPES[entry["dtype"]][0]
    b, e = entry["data_offsets"]
    new = body[b:e][: count * size].ljust(count * size, b"\0")
    body = body[:b] + new + body[e:]
    shift = len(new) - (e - b)
    for v in header.values():
        if isinstance(v, dict) and "data_offsets" in v and v is not entry and v["data_offsets"][0] >= e:
            v["data_offsets"] = [v["data_offsets"][0] + shift, v["data_offsets"][1] + shift]
    entry["shape"], entry["data_offsets"] = [count], [b, b + len(new)]
    return header, body


@st.composite
def document_mutations(draw, valid: dict[str, bytes]) -> bytes:
    header, body = _split(valid[draw(st.sampled_from(sorted(valid)))])
    doc = json.loads(header["__metadata__"]["spra"])
    values = st.one_of(json_values, special)
    for _ in range(draw(st.integers(1, 3))):
        tensors = doc.get("tensors") if isinstance(doc.get("tensors"), list) else []
        entries = [t for t in tensors if isinstance(t, dict)]
        op = draw(st.sampled_from(DOC_OPS))
        if op == "top":
            doc[draw(st.sampled_from(TOP_KEYS))] = draw(values)
        elif op == "top-drop":
            doc.pop(draw(st.sampled_from(TOP_KEYS)), None)
        elif op == "top-extra":
            doc[draw(st.text(max_size=6))] = draw(values)
        elif not entries:
            doc["tensors"] = draw(st.lists(json_values, max_size=2))
        elif op == "entry":
            draw(st.sampled_from(entries))[draw(st.sampled_from(ENTRY_KEYS))] = draw(values)
        elif op == "entry-drop":
            draw(st.sampled_from(entries)).pop(draw(st.sampled_from(ENTRY_KEYS)), None)
        elif op == "entry-extra":
            draw(st.sampled_from(entries))[draw(st.text(max_size=6))] = draw(values)
        elif op == "support":
            entry = draw(st.sampled_from(entries))
            if not isinstance(entry.get("support"), dict):
                entry["support"] = {}
            entry["support"][draw(st.sampled_from(SUPPORT_KEYS))] = draw(values)
        elif op == "duplicate":
            tensors.append(json.loads(json.dumps(draw(st.sampled_from(entries)))))
        else:  # a new count, with the values tensor resized to match it
            entry = draw(st.sampled_from(entries))
            count = draw(st.one_of(st.integers(0, 300), st.sampled_from([2**31, 2**62, 2**62 - 1, -1])))
            entry["count"] = count
            if isinstance(entry.get("name"), str):
                header, body = _resize_values(header, body, entry["name"], count)
    header["__metadata__"]["spra"] = json.dumps(doc)
    return _join(header, body)


def test_document_mutations(valid, target):
    outcomes: dict[str, int] = {}

    @FUZZ
    @given(document_mutations(valid))
    def run(data):
        outcome = check_reader(target, data)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    run()
    # The mutations must reach the document checks, not just break the container.
    assert outcomes.get("container-only", 0) > 0, outcomes


def test_small_inputs_exhaustively(target):
    """All-zero files of 0..16 bytes, and tiny headers that are not tensor tables, are refused cleanly."""
    for n in range(17):
        assert check_reader(target, b"\0" * n) == "refused"
    for raw in [b"{}", b"[]", b"null", b'"x"', b"1", b"{", b"\xff\xfe", b'{"__metadata__":null}', b'{"a":1}']:
        assert check_reader(target, _join(raw, b"")) in ("refused", "container-only")


HUGE_DIGITS = "9" * 5000  # beyond Python's default int <-> str limit (4300 digits)


def _with_document_text(valid: dict[str, bytes], edit) -> bytes:
    header, body = _split(valid["synthetic-mixed"])
    header["__metadata__"]["spra"] = edit(header["__metadata__"]["spra"])
    return _join(header, body)


PINNED = [
    pytest.param(
        lambda valid: _join('{"x":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
        id="container-dtype-is-a-list",
    ),
    pytest.param(
        lambda valid: _join('{"x":{"dtype":{},"shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
        id="container-dtype-is-an-object",
    ),
    pytest.param(
        lambda valid: _join('{"x":{"dtype":"U8","shape":[' + HUGE_DIGITS + '],"data_offsets":[0,1]}}', b"\0"),
        id="container-5000-digit-integer",
    ),
    pytest.param(
        lambda valid: _with_document_text(valid, lambda t: t.replace('"version":1', '"version":' + HUGE_DIGITS, 1)),
        id="document-5000-digit-integer",
    ),
    pytest.param(
        lambda valid: _with_document_text(valid, lambda t: "[" * 100_000 + "]" * 100_000),
        id="document-deeply-nested",
    ),
    pytest.param(
        lambda valid: _join("[" * 100_000 + "]" * 100_000, b""),
        id="container-deeply-nested",
    ),
]


@pytest.mark.parametrize("make", PINNED)
def test_pinned_hostile_inputs(make, valid, target):
    """Minimal hostile inputs, pinned: the reader refuses them with FormatError (or reads them sanely)."""
    check_reader(target, make(valid))


# ---------------------------------------------------------------------------------------------
# The campaign: a seeded mutation loop through Adapter.load and every read command
# ---------------------------------------------------------------------------------------------

RAW_VALUES = [  # JSON text put in place of a value: what a hostile writer can put in the document
    "NaN", "Infinity", "-Infinity", "1e999", "-0.0", "null", "true", "false", '""', "[]", "{}",
    str(2**31), str(2**53 + 1), str(2**62), str(2**64), str(-(2**63)), "9" * 5000, "0.5", "-1",
    "[" * 5000 + "]" * 5000, '{"a":' * 3000 + "1" + "}" * 3000,
    '"\\ud800"', '"\\udfff x"', '"\\u0000"', '"a\\nb\\u001b[31m"', '"\\u202eevil"', '"\u00e9\u0301\U0001f600"',
    '"F32"', '"BF16"', '"seeded"', '"explicit"', '"elias-fano"', "[1,2,3]", "[4096]", "[64,64]",
]  # fmt: skip
_MARK = "\u2603fuzz\u2603"


def _paths(value, prefix=()):
    """Every (path, value) inside a JSON value, the value itself first."""
    yield prefix, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _mutate_json(text: str, rng: np.random.Generator) -> str:
    """`text` (a JSON object) with one value replaced by hostile raw JSON, a key duplicated, or a
    key renamed to odd Unicode."""
    value = json.loads(text)
    paths = [p for p, _ in _paths(value) if p]
    if not paths:
        return text
    path = paths[rng.integers(len(paths))]
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    op = rng.integers(3)
    if op == 0 or not isinstance(parent, dict):
        parent[path[-1]] = _MARK
        raw = RAW_VALUES[rng.integers(len(RAW_VALUES))]
        return json.dumps(value).replace(json.dumps(_MARK), raw, 1)
    if op == 1:  # a duplicate key, later in the same object
        parent[_MARK] = parent[path[-1]]
        return json.dumps(value).replace(json.dumps(_MARK), json.dumps(path[-1]), 1)
    parent[_MARK] = parent.pop(path[-1])
    return json.dumps(value).replace(json.dumps(_MARK), RAW_VALUES[21 + rng.integers(6)], 1)


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One hostile variant of a valid adapter file: bit flips (anywhere or in the tensor data),
    truncation, a rewritten header length, or a mutation of the header or document JSON."""
    data = bytearray(data)
    n = struct.unpack("<Q", data[:8])[0]
    op = rng.integers(6)
    if op == 0:
        for pos in rng.integers(0, len(data), rng.integers(1, 9)):
            data[pos] ^= 1 << rng.integers(8)
    elif op == 1 and len(data) > 8 + n:
        for pos in rng.integers(8 + n, len(data), rng.integers(1, 4)):
            data[pos] ^= 1 << rng.integers(8)
    elif op == 2:
        del data[rng.integers(0, len(data)) :]
    elif op == 3:
        new = [n + int(rng.integers(-16, 17)), int(rng.integers(0, 2**63)), 0, len(data), 2**64 - 1][rng.integers(5)]
        data[:8] = struct.pack("<Q", max(0, min(new, 2**64 - 1)))
    else:
        header, body = _split(bytes(data))
        if op == 4 or "__metadata__" not in header or "spra" not in header.get("__metadata__", {}):
            return _join(_mutate_json(json.dumps(header), rng), body)
        header["__metadata__"]["spra"] = _mutate_json(header["__metadata__"]["spra"], rng)
        return _join(header, body)
    return bytes(data)


def _read_commands(path: Path, original: Path, base: Path, adapter) -> list[list]:
    first = next(iter(adapter.deltas), None)
    commands = [["info", path], ["info", path, "--json"], ["compare", path, original], ["verify", base, path]]
    if first is not None and adapter.deltas[first].numel <= 1 << 24:
        commands.append(["info", path, "--indices", first])
    return commands


def run_campaign(cases: int, seed: int, valid: dict[str, bytes], base: Path, work: Path) -> dict[str, int]:
    """`cases` mutated files through the reader and, when one loads, through every read command in
    process: every failure is one FormatError / one error line, never a traceback or a crash.
    Returns the counts of outcomes."""
    from conftest import call_cli_in_process

    from spra_tools.adapter import Adapter
    from spra_tools.errors import SpraError

    rng = np.random.default_rng(seed)
    labels = sorted(valid)
    originals = {}
    for label in labels:
        originals[label] = work / f"original-{label}.spra"
        originals[label].write_bytes(valid[label])
    counts = {"cases": 0, "refused": 0, "loaded": 0, "commands": 0, "command-errors": 0}
    path = work / "case.spra"
    for case in range(cases):
        label = labels[rng.integers(len(labels))]
        data = mutate(valid[label], rng)
        counts["cases"] += 1
        path.write_bytes(data)
        try:
            adapter = Adapter.load(path)
        except SpraError:
            counts["refused"] += 1
            continue
        counts["loaded"] += 1
        for argv in _read_commands(path, originals[label], base, adapter):
            r = call_cli_in_process(*argv)
            counts["commands"] += 1
            context = f"case {case} (seed {seed}) of {label}: {argv[0]} -> rc {r.rc}\n{r.stderr[-2000:]}"
            assert r.rc in (0, 1) and "Traceback" not in r.stderr, context
            if r.rc:
                counts["command-errors"] += 1
                lines = r.stderr.splitlines()
                assert len(lines) == 1 and lines[0].startswith("spra-tools: error: "), context
    return counts


CAMPAIGN_CASES = int(os.environ.get("SPRA_TOOLS_FUZZ_CASES", "20000"))


def test_campaign_ci_budget(valid, tiny_llama, tmp_path):
    counts = run_campaign(150, 0, valid, tiny_llama, tmp_path)
    assert counts["loaded"] > 0 and counts["refused"] > 0 and counts["commands"] > 0, counts


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SPRA_TOOLS_SLOW"), reason="the full campaign: set SPRA_TOOLS_SLOW=1")
def test_campaign_slow(valid, tiny_llama, tmp_path):
    counts = run_campaign(CAMPAIGN_CASES, 1, valid, tiny_llama, tmp_path)
    print(f"\nfuzz campaign: {counts}")
    assert counts["cases"] >= CAMPAIGN_CASES
