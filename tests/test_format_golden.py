"""Golden bytes of a small .spra file, and its compatibility with the `safetensors` library.

The adapter below is built deterministically (no RNG); its serialisation is pinned by a SHA-256.
If this test fails after a change to format.py, the change altered the bytes on disk: that needs
a format decision (docs/FORMAT.md §9), not a new constant.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open

from spra_tools.adapter import Adapter, TensorDelta, explicit_delta
from spra_tools.dtypes import raw_bits
from spra_tools.errors import FormatError
from spra_tools.fingerprint import fingerprint, fingerprints
from spra_tools.support import ExplicitSupport, SeededSupport

GOLDEN_SHA256 = "33299d32ec75136b5429da4b520f5d1a18de128acd96cc3675a20d08b36dbbf6"
GOLDEN_SIZE = 2006
GOLDEN_HEADER_LEN = 1680  # u64 little-endian: 90 06 00 00 00 00 00 00

SEEDED = "model.layers.0.self_attn.v_proj.weight"
EXPLICIT = "model.layers.0.mlp.down_proj.weight"
DENSE = "score.weight"


def golden_adapter() -> Adapter:
    # A bf16 base tensor with a seeded support and bf16 values.
    w1 = (torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32) / 1000 - 1).to(torch.bfloat16)
    s1 = SeededSupport(7, SEEDED, w1.numel(), 0.05)
    idx1 = torch.from_numpy(s1.indices())
    v1 = ((torch.arange(s1.count, dtype=torch.float32) - 50) / 64).to(torch.bfloat16)
    d1 = TensorDelta(SEEDED, tuple(w1.shape), w1.dtype, s1, v1, fingerprints(w1.reshape(-1)[idx1]))
    # An fp32 base tensor with an explicit support and fp32 values (awkward bit patterns on purpose).
    # The 14 bytes of its support code leave its values 2 bytes off 4-byte alignment in the file.
    # Only single correctly rounded IEEE operations (no linspace): the same bits on every build.
    w2 = ((torch.arange(16 * 48, dtype=torch.float32) - 384) / 192).reshape(16, 48)
    flat2 = np.array([0, 1, 2, 47, 48, 100, 101, 300, 383, 500, 765, 766, 767], dtype=np.int64)
    v2 = torch.tensor([1e-8, -3.5, 0.1, 2.0**-20, -0.0, 7.0, 1 / 3, -1e6, 0.5, 2.0**-126, 1e-40, 65504.0, 3e38])
    d2 = explicit_delta(EXPLICIT, tuple(w2.shape), w2.dtype, flat2, v2, w2.reshape(-1)[torch.from_numpy(flat2)])
    # A new dense head.
    head = (torch.arange(3 * 8, dtype=torch.float32).reshape(3, 8) / 7).to(torch.bfloat16)
    return Adapter(
        deltas={SEEDED: d1, EXPLICIT: d2},
        dense={DENSE: head},
        base={"name": "tiny-base", "revision": "0123abcd", "numel": 64 * 32 + 16 * 48 + 3 * 8},
        task={"labels": ["négatif", "positif"], "prompt": "Review: {text}\nSentiment:"},
        provenance={"method": "test", "seed": 7, "density": 0.05},
        exact=True,
    )


@pytest.fixture
def saved(tmp_path):
    adapter = golden_adapter()
    path = tmp_path / "golden.spra"
    adapter.save(path)
    return adapter, path


def test_golden_bytes(saved):
    _, path = saved
    data = path.read_bytes()
    assert len(data) == GOLDEN_SIZE
    assert data[:8] == bytes([0x90, 0x06, 0, 0, 0, 0, 0, 0]) == struct.pack("<Q", GOLDEN_HEADER_LEN)
    n = GOLDEN_HEADER_LEN
    assert n % 8 == 0
    header = data[8 : 8 + n]
    assert header.startswith(b'{"__metadata__":{"spra":')
    assert header.rstrip(b" ") == header.rstrip()  # padding is spaces only
    assert json.loads(header)  # compact JSON, then spaces
    assert hashlib.sha256(data).hexdigest() == GOLDEN_SHA256


def test_golden_layout(saved):
    _, path = saved
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    doc = json.loads(header.pop("__metadata__")["spra"])
    # Tensors in the order write_spra emits them, back to back from offset 0.
    assert list(header) == [
        "values/" + SEEDED,
        "support_low/" + EXPLICIT,
        "support_high/" + EXPLICIT,
        "values/" + EXPLICIT,
        "dense/" + DENSE,
    ]
    end = 0
    for entry in header.values():
        assert entry["data_offsets"][0] == end
        end = entry["data_offsets"][1]
    assert 8 + n + end == len(data)
    assert header["values/" + SEEDED] == {"dtype": "BF16", "shape": [102], "data_offsets": [0, 204]}
    assert header["support_low/" + EXPLICIT] == {"dtype": "U8", "shape": [9], "data_offsets": [204, 213]}
    assert header["support_high/" + EXPLICIT] == {"dtype": "U8", "shape": [5], "data_offsets": [213, 218]}
    assert header["values/" + EXPLICIT]["data_offsets"][0] % 4 == 2  # no per-tensor alignment
    assert list(doc) == [
        "format", "version", "minor", "scheme", "exact", "base", "tensors", "checksums", "task", "provenance"
    ]  # fmt: skip
    assert (doc["format"], doc["version"], doc["minor"], doc["scheme"], doc["exact"]) == (
        "spra", 1, 1, "spra-seeded-v1", True
    )  # fmt: skip
    assert list(doc["checksums"]) == list(header)  # every tensor, in container order
    assert doc["checksums"]["values/" + SEEDED] == hashlib.blake2b(data[8 + n : 8 + n + 204], digest_size=8).hexdigest()
    t0, t1 = doc["tensors"]
    assert t0["support"] == {"kind": "seeded", "seed": 7, "density": 0.05}
    assert (t0["name"], t0["shape"], t0["dtype"], t0["count"]) == (SEEDED, [64, 32], "BF16", 102)
    assert list(t0["fingerprint"]) == ["BF16"]
    assert t1["support"] == {"kind": "explicit", "code": "elias-fano"}
    assert (t1["dtype"], t1["count"]) == ("F32", 13)
    assert list(t1["fingerprint"]) == ["BF16", "F16", "F32"]  # sorted; fp32 bases record their casts


def test_safetensors_library_reads_our_file(saved):
    adapter, path = saved
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {
            "values/" + SEEDED,
            "support_low/" + EXPLICIT,
            "support_high/" + EXPLICIT,
            "values/" + EXPLICIT,
            "dense/" + DENSE,
        }
        doc = json.loads(f.metadata()["spra"])
        assert doc["format"] == "spra"
        v1 = f.get_tensor("values/" + SEEDED)
        assert v1.dtype == torch.bfloat16 and torch.equal(
            v1.view(torch.int16), adapter.deltas[SEEDED].values.view(torch.int16)
        )
        v2 = f.get_tensor("values/" + EXPLICIT)
        assert v2.dtype == torch.float32 and torch.equal(
            v2.view(torch.int32), adapter.deltas[EXPLICIT].values.view(torch.int32)
        )
        head = f.get_tensor("dense/" + DENSE)
        assert head.dtype == torch.bfloat16 and head.shape == (3, 8)
        assert torch.equal(head.view(torch.int16), adapter.dense[DENSE].view(torch.int16))
        low = f.get_tensor("support_low/" + EXPLICIT)
        high = f.get_tensor("support_high/" + EXPLICIT)
        assert low.dtype == high.dtype == torch.uint8
        from spra_tools.support import ef_decode

        flat = ef_decode(low.numpy(), high.numpy(), 16 * 48, 13)
        assert np.array_equal(flat, adapter.deltas[EXPLICIT].support.flat)


def test_load_round_trips_everything(saved):
    adapter, path = saved
    back = Adapter.load(path)
    assert list(back.deltas) == list(adapter.deltas)
    for name, d in adapter.deltas.items():
        e = back.deltas[name]
        assert (e.name, e.shape, e.dtype, e.count) == (d.name, d.shape, d.dtype, d.count)
        assert type(e.support) is type(d.support)
        assert np.array_equal(e.support.indices(), d.support.indices())
        if isinstance(d.support, SeededSupport):
            assert e.support == d.support
        else:
            assert isinstance(e.support, ExplicitSupport) and e.support.numel == d.support.numel
        assert e.values.dtype == d.values.dtype
        assert np.array_equal(raw_bits(e.values), raw_bits(d.values))  # bit-exact, incl. -0.0 and subnormals
        assert e.fingerprint == d.fingerprint
    assert list(back.dense) == [DENSE]
    assert back.dense[DENSE].dtype == torch.bfloat16
    assert np.array_equal(raw_bits(back.dense[DENSE]), raw_bits(adapter.dense[DENSE]))
    assert (back.base, back.task, back.provenance, back.exact) == (
        adapter.base,
        adapter.task,
        adapter.provenance,
        adapter.exact,
    )
    # Saving what was loaded gives the same bytes.
    again = path.with_name("again.spra")
    back.save(again)
    assert again.read_bytes() == path.read_bytes()


def test_fingerprint_formula(saved):
    adapter, _ = saved
    d = adapter.deltas[SEEDED]
    w1 = (torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32) / 1000 - 1).to(torch.bfloat16)
    bits = raw_bits(w1.reshape(-1)[d.indices()]).astype(np.uint64).tolist()
    m64 = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        return z ^ (z >> 31)

    want = sum(mix((b + (k + 1) * 0x9E3779B97F4A7C15) & m64) for k, b in enumerate(bits)) & m64
    assert d.fingerprint == {"BF16": f"{want:016x}"}
    assert fingerprint(np.array(bits, dtype=np.uint16)) == f"{want:016x}"


# fingerprint() accumulates in a numpy uint64 scalar, which warns when the sum wraps.
@pytest.mark.filterwarnings("ignore:overflow encountered in scalar add:RuntimeWarning")
def test_fingerprint_beyond_one_chunk():
    """More values than fingerprint.py processes per pass (2**20): the chunked sum still wraps mod 2**64."""
    n = (1 << 20) * 2 + 5
    bits = (np.arange(n, dtype=np.uint64) * np.uint64(2654435761) % np.uint64(1 << 32)).astype(np.uint32)
    z = bits.astype(np.uint64) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    want = sum(int(part.sum(dtype=np.uint64)) for part in np.array_split(z, 7)) % (1 << 64)
    assert fingerprint(bits) == f"{want:016x}"


def _rewritten(data: bytes, edit_doc, edit_body=lambda body: body) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    doc = json.loads(header["__metadata__"]["spra"])
    edit_doc(doc)
    header["__metadata__"]["spra"] = json.dumps(doc, separators=(",", ":"))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + edit_body(data[8 + n :])


def test_a_version_1_0_file_still_reads(saved, tmp_path):
    """1.0 files (no `minor`, no `checksums`) read as before, to the same adapter."""
    adapter, path = saved
    old = tmp_path / "v1.0.spra"
    old.write_bytes(_rewritten(path.read_bytes(), lambda doc: [doc.pop("minor"), doc.pop("checksums")]))
    loaded = Adapter.load(old)
    assert loaded.deltas.keys() == adapter.deltas.keys()
    for name, d in adapter.deltas.items():
        assert torch.equal(loaded.deltas[name].values, d.values)


@pytest.mark.parametrize("where", [0, 210, 230, -1], ids=["seeded-values", "support", "explicit-values", "dense"])
def test_a_flipped_bit_in_tensor_data_is_refused(saved, tmp_path, where):
    _, path = saved
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8 + n + where if where >= 0 else where] ^= 0x10
    bad = tmp_path / "flipped.spra"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="do not match their checksum|support"):
        Adapter.load(bad)


def test_checksums_must_cover_every_tensor(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "partial.spra"
    bad.write_bytes(_rewritten(path.read_bytes(), lambda doc: doc["checksums"].popitem()))
    with pytest.raises(FormatError, match="is not described by the adapter document"):
        Adapter.load(bad)
    bad.write_bytes(_rewritten(path.read_bytes(), lambda doc: doc["checksums"].update({"values/x": "0" * 16})))
    with pytest.raises(FormatError, match="'checksums' names tensor 'values/x'"):
        Adapter.load(bad)
