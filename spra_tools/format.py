"""Bytes on disk: the safetensors container, and the .spra adapter document inside it.

Two layers, both defensive. The container layer reads and writes safetensors files (our own
adapters and the base checkpoints): every length, offset, dtype and shape is bounded and checked
against the file size before anything is allocated, and writing streams tensor by tensor. The
adapter layer (`read_spra` / `write_spra`) validates the JSON document of docs/FORMAT.md against
the tensors that carry it. Neither knows about torch modules; arrays are numpy (bf16 as uint16).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from . import support as sup
from .errors import FormatError

MAGIC = "spra"
VERSION = 1
MINOR = 1  # 1.1 adds `checksums`; a 1.0 file (no `minor`, no `checksums`) reads as before
METADATA_KEY = "spra"
MAX_HEADER = 100 << 20  # the safetensors limit
MAX_DIMS = 8
# The work a file can demand before any base is read: regenerating a seeded support costs one step
# per 2**16-element block whatever its density, so a tiny file declaring a [2**47] tensor would cost
# 2**31 steps. An adapted tensor declares at most 2**36 elements (16 times the largest tensors of
# today's models), a file at most 2**40 in all.
MAX_TENSOR_NUMEL = 1 << 36
MAX_FILE_NUMEL = 1 << 40

# safetensors dtype name -> (bytes per element, numpy dtype carrying the raw bits). Every dtype a
# checkpoint may hold; dtypes.TORCH_DTYPES is its torch side, checked against it.
DTYPES: dict[str, tuple[int, np.dtype]] = {
    "BOOL": (1, np.dtype(np.bool_)),
    "U8": (1, np.dtype(np.uint8)),
    "I8": (1, np.dtype(np.int8)),
    "F8_E4M3": (1, np.dtype(np.uint8)),
    "F8_E5M2": (1, np.dtype(np.uint8)),
    "I16": (2, np.dtype("<i2")),
    "U16": (2, np.dtype("<u2")),
    "F16": (2, np.dtype("<f2")),
    "BF16": (2, np.dtype("<u2")),
    "I32": (4, np.dtype("<i4")),
    "U32": (4, np.dtype("<u4")),
    "F32": (4, np.dtype("<f4")),
    "I64": (8, np.dtype("<i8")),
    "U64": (8, np.dtype("<u8")),
    "F64": (8, np.dtype("<f8")),
}
# The dtypes an adapter may hold: of its base tensors, its values, its dense tensors, its fingerprints.
FLOAT_DTYPES = ("F32", "BF16", "F16")
# How users spell them (`--values-dtype`, training configs).
SHORT_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
_HEX16 = re.compile(r"[0-9a-f]{16}")


# ---------------------------------------------------------------------------------------------
# Container
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a container; offsets are absolute positions in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Container:
    """A validated safetensors header: tensor table in file order plus the string metadata."""

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_size: int
    file_size: int

    def read_bytes(self, name: str, f: BinaryIO | None = None) -> bytearray:
        info = self.tensors[name]
        buf = bytearray(info.nbytes)
        if f is None:
            with open(self.path, "rb") as fh:
                _read_exact(fh, info.begin, buf, self.path)
        else:
            _read_exact(f, info.begin, buf, self.path)
        return buf

    def read_array(self, name: str, f: BinaryIO | None = None) -> np.ndarray:
        """The tensor's raw elements as a flat numpy array (bf16 viewed as uint16)."""
        info = self.tensors[name]
        return np.frombuffer(self.read_bytes(name, f), dtype=DTYPES[info.dtype][1])


def _read_exact(f: BinaryIO, offset: int, buf: bytearray, path: str) -> None:
    f.seek(offset)
    view = memoryview(buf)
    while view:
        n = f.readinto(view)
        if not n:
            raise FormatError("file ended early (truncated?)", path)
        view = view[n:]


def read_container(path: str | os.PathLike) -> Container:
    """Parse and validate a safetensors header; reads only the header bytes."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise FormatError(f"not a safetensors file ({file_size} bytes)", path)
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER or 8 + n > file_size:
                raise FormatError(
                    f"header length {n} does not fit the file ({file_size} bytes; truncated or not safetensors)",
                    path,
                )
            raw = f.read(n)
    except IsADirectoryError:
        raise FormatError("is a directory, expected a file", path) from None
    except FileNotFoundError:
        raise FormatError("no such file", path) from None
    except PermissionError:
        raise FormatError("permission denied", path) from None
    try:
        header = _strict_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"header is not valid JSON ({e.__class__.__name__}: {e})", path) from None
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object", path)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError("__metadata__ must map strings to strings", path)
    data_start = 8 + n
    data_size = file_size - data_start
    infos = []
    for name, entry in header.items():
        infos.append(_tensor_info(path, name, entry, data_start, data_size))
    infos.sort(key=lambda t: (t.begin, t.end))
    cursor = data_start
    for t in infos:
        if t.begin != cursor:
            raise FormatError(f"tensor {t.name!r} does not start where the previous one ends", path)
        cursor = t.end
    if cursor != file_size:
        raise FormatError(
            f"tensor data covers {cursor - data_start} of {data_size} bytes (truncated or trailing bytes)",
            path,
        )
    return Container(path, {t.name: t for t in infos}, metadata, n, file_size)


def _tensor_info(path, name, entry, data_start, data_size) -> TensorInfo:
    if not isinstance(entry, dict):
        raise FormatError(f"tensor {name!r}: entry is not an object", path)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(f"tensor {name!r}: unsupported dtype {dtype!r}", path)
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_count(d) for d in shape)):
        raise FormatError(f"tensor {name!r}: invalid shape {shape!r}", path)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise FormatError(f"tensor {name!r}: invalid data_offsets {offsets!r}", path)
    begin, end = offsets
    if not begin <= end <= data_size:
        raise FormatError(
            f"tensor {name!r}: data_offsets {offsets} outside the data ({data_size} bytes; truncated?)", path
        )
    numel = math.prod(shape)
    if numel * DTYPES[dtype][0] != end - begin:
        raise FormatError(f"tensor {name!r}: shape {shape} x {dtype} does not match {end - begin} bytes", path)
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _strict_json(text: str):
    """JSON as the writer makes it: no NaN / Infinity (Python's reader accepts them, the writer
    refuses them); no duplicate key (readers disagree on which one counts); no lone surrogate (a
    \\ud800 escape decodes to a string that no file, terminal or UTF-8 writer can take)."""
    value = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    if _SURROGATE.search(text) and _has_surrogate(value):
        raise ValueError("a string holds a lone surrogate (invalid Unicode)")
    return value


_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # only an escape can put a surrogate into decoded text


def _has_surrogate(value) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < (1 << 62)


def container_header(specs: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """The header bytes for tensors (name, dtype, shape) laid out back to back in the given order.

    The JSON is compact, keys in insertion order, padded with spaces to a multiple of 8 bytes:
    the same inputs always give the same bytes.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * DTYPES[dtype][0]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_container(f: BinaryIO, tensors: list[tuple[str, str, np.ndarray]], metadata: dict[str, str] | None) -> None:
    """Write (name, dtype, array) tensors; arrays hold the raw little-endian elements."""
    f.write(container_header(((n, d, a.shape) for n, d, a in tensors), metadata))
    for _, _, array in tensors:
        f.write(np.ascontiguousarray(array).tobytes())


# ---------------------------------------------------------------------------------------------
# The .spra document
# ---------------------------------------------------------------------------------------------

VALUES, LOW, HIGH, DENSE = "values/", "support_low/", "support_high/", "dense/"


@dataclass
class TensorRecord:
    """One adapted tensor as stored: its document entry and its arrays."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # the base tensor's dtype
    support: sup.Support
    values: np.ndarray  # raw elements, len == support.count
    values_dtype: str
    fingerprint: dict[str, str]


@dataclass
class DenseRecord:
    """A whole tensor that replaces (or adds) a base tensor, e.g. a new classification head."""

    name: str
    dtype: str
    array: np.ndarray  # raw elements with the tensor's shape


@dataclass
class SpraFile:
    """Everything in one .spra file: document fields plus the decoded tensors."""

    tensors: list[TensorRecord]
    dense: list[DenseRecord]
    base: dict
    task: dict
    provenance: dict
    exact: bool


def write_spra(f: BinaryIO, spra: SpraFile) -> None:
    entries, arrays = [], []
    if sum(math.prod(t.shape) for t in spra.tensors) > MAX_FILE_NUMEL:
        raise FormatError("the adapted tensors hold more than 2**40 elements in all")
    for t in spra.tensors:
        if math.prod(t.shape) > MAX_TENSOR_NUMEL:
            raise FormatError(f"tensor {t.name!r} has more than 2**36 elements")
        entry = {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "count": t.support.count}
        if isinstance(t.support, sup.SeededSupport):
            entry["support"] = {"kind": "seeded", "seed": t.support.seed, "density": float(t.support.density)}
        else:
            entry["support"] = {"kind": "explicit", "code": "elias-fano"}
            low, high = sup.ef_encode(t.support.flat, t.support.numel)
            arrays += [(LOW + t.name, "U8", low), (HIGH + t.name, "U8", high)]
        entry["fingerprint"] = dict(sorted(t.fingerprint.items()))
        entries.append(entry)
        arrays.append((VALUES + t.name, t.values_dtype, t.values.reshape(-1)))
    for d in spra.dense:
        arrays.append((DENSE + d.name, d.dtype, d.array))
    doc = {
        "format": MAGIC,
        "version": VERSION,
        "minor": MINOR,
        "scheme": sup.SCHEME,
        "exact": spra.exact,
        "base": spra.base,
        "tensors": entries,
        "checksums": {name: checksum(array) for name, _, array in arrays},
        "task": spra.task,
        "provenance": spra.provenance,
    }
    meta = {METADATA_KEY: json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)}
    write_container(f, arrays, meta)


def checksum(array: np.ndarray) -> str:
    """The checksum of a tensor's bytes (docs/FORMAT.md §3): BLAKE2b with an 8-byte digest, in hex."""
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _checksums(doc: dict, c: Container) -> dict[str, str] | None:
    """The document's checksums (None in a 1.0 file), checked for shape: one per container tensor."""
    minor = doc.get("minor", 0)
    if not _is_count(minor):
        raise FormatError(f"document field 'minor' must be a non-negative integer, got {minor!r}", c.path)
    sums = doc.get("checksums")
    if sums is None:
        return None
    if not isinstance(sums, dict) or not all(isinstance(v, str) and _HEX16.fullmatch(v) for v in sums.values()):
        raise FormatError("'checksums' must map tensor names to 16 lowercase hex digits", c.path)
    unsummed = sorted(set(c.tensors) - set(sums))
    if unsummed:
        raise FormatError(f"tensor {unsummed[0]!r} is not described by the adapter document (no checksum)", c.path)
    absent = sorted(set(sums) - set(c.tensors))
    if absent:
        raise FormatError(f"'checksums' names tensor {absent[0]!r}, which the container does not hold", c.path)
    return sums


def read_spra(path: str | os.PathLike) -> SpraFile:
    """Read and fully validate a .spra file (see docs/FORMAT.md §8 for the checks)."""
    c = read_container(path)
    path = c.path
    raw = c.metadata.get(METADATA_KEY)
    if raw is None:
        raise FormatError("not a spra adapter (no 'spra' entry in the safetensors metadata)", path)
    try:
        doc = _strict_json(raw)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"adapter document is not valid JSON ({e})", path) from None
    if not isinstance(doc, dict) or doc.get("format") != MAGIC:
        raise FormatError("not a spra adapter document", path)
    version = doc.get("version")
    if type(version) is not int or version != VERSION:
        raise FormatError(
            f"format version {version!r} is not supported (this spra-tools reads version {VERSION}); "
            "upgrade spra-tools",
            path,
        )
    if doc.get("scheme") != sup.SCHEME:
        raise FormatError(f"unknown support scheme {doc.get('scheme')!r}", path)
    for key, kind in (("base", dict), ("task", dict), ("provenance", dict), ("tensors", list), ("exact", bool)):
        if not isinstance(doc.get(key), kind):
            raise FormatError(f"document field {key!r} must be a {kind.__name__}", path)
    numel = doc["base"].get("numel")
    if numel is not None and not _is_count(numel):
        raise FormatError(f"base 'numel' must be a non-negative integer, got {numel!r}", path)

    sums = _checksums(doc, c)
    expected: set[str] = set()
    records, seen, total = [], set(), 0
    with open(path, "rb") as f:

        def read(name: str) -> np.ndarray:
            array = c.read_array(name, f)
            if sums is not None and checksum(array) != sums[name]:
                raise FormatError(f"tensor {name!r}: its bytes do not match their checksum (corrupt file)", path)
            return array

        for i, entry in enumerate(doc["tensors"]):
            rec = _read_record(c, read, i, entry)
            total += math.prod(rec.shape)
            if total > MAX_FILE_NUMEL:
                raise FormatError("the adapted tensors declare more than 2**40 elements in all", path)
            if rec.name in seen:
                raise FormatError(f"tensor {rec.name!r} appears twice", path)
            seen.add(rec.name)
            expected.add(VALUES + rec.name)
            if isinstance(rec.support, sup.ExplicitSupport):
                expected |= {LOW + rec.name, HIGH + rec.name}
            records.append(rec)
        dense = []
        for name, info in c.tensors.items():
            if name.startswith(DENSE):
                if info.dtype not in FLOAT_DTYPES:
                    raise FormatError(f"dense tensor {name!r} has dtype {info.dtype}", path)
                if name[len(DENSE) :] in seen:
                    raise FormatError(f"{name!r} is also an adapted tensor", path)
                array = read(name).reshape(info.shape)
                dense.append(DenseRecord(name[len(DENSE) :], info.dtype, array))
                expected.add(name)
    stray = sorted(set(c.tensors) - expected)
    if stray:
        raise FormatError(f"tensor {stray[0]!r} is not described by the adapter document", path)
    return SpraFile(records, dense, doc["base"], doc["task"], doc["provenance"], doc["exact"])


def _read_record(c: Container, read, i: int, entry) -> TensorRecord:
    path = c.path

    def bad(msg):
        return FormatError(f"tensor entry {i}{' (' + repr(name) + ')' if name else ''}: {msg}", path)

    name = entry.get("name") if isinstance(entry, dict) else None
    if not isinstance(entry, dict) or not isinstance(name, str) or not name:
        raise bad("must be an object with a non-empty 'name'")
    shape, dtype, count = entry.get("shape"), entry.get("dtype"), entry.get("count")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_count(d) for d in shape)):
        raise bad(f"invalid shape {shape!r}")
    numel = math.prod(shape)
    if numel > MAX_TENSOR_NUMEL:
        raise bad(f"shape {shape} has more than 2**36 elements")
    if dtype not in FLOAT_DTYPES:
        raise bad(f"base dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    if not _is_count(count) or count > numel:
        raise bad(f"count {count!r} is not in [0, {numel}]")
    fp = entry.get("fingerprint")
    if not (
        isinstance(fp, dict)
        and fp
        and dtype in fp
        and all(k in FLOAT_DTYPES and isinstance(v, str) and _HEX16.fullmatch(v) for k, v in fp.items())
    ):
        raise bad("fingerprint must map the base dtype (and optionally its casts) to 16 lowercase hex digits")
    spec = entry.get("support")
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "seeded":
        seed, density = spec.get("seed"), spec.get("density")
        try:
            support = sup.SeededSupport(seed, name, numel, density)
        except ValueError as e:
            raise bad(str(e)) from None
        if support.count != count:
            raise bad(f"count {count} differs from the seeded count {support.count}")
    elif kind == "explicit" and spec.get("code") == "elias-fano":
        low_bytes, high_bytes = sup.ef_sizes(numel, count)
        for key, size in ((LOW + name, low_bytes), (HIGH + name, high_bytes)):
            info = c.tensors.get(key)
            if info is None or info.dtype != "U8" or info.shape != (size,):
                raise bad(f"support tensor {key!r} must be U8 of shape [{size}]")
        try:
            flat = sup.ef_decode(read(LOW + name), read(HIGH + name), numel, count)
        except ValueError as e:
            raise bad(str(e)) from None
        support = sup.ExplicitSupport(numel, flat)
    else:
        raise bad(f"unknown support {spec!r}")
    vinfo = c.tensors.get(VALUES + name)
    if vinfo is None or vinfo.dtype not in FLOAT_DTYPES or vinfo.shape != (count,):
        raise bad(f"values tensor must be one of {', '.join(FLOAT_DTYPES)} with shape [{count}]")
    values = read(VALUES + name)
    return TensorRecord(name, tuple(shape), dtype, support, values, vinfo.dtype, fp)
