"""Records of a training data file: JSON Lines, JSON, CSV, Parquet or a `datasets` directory.

Each reader yields plain dicts with where each came from (line, row or record number), so every
later problem can name the file and the place. Nothing here knows about tokens or tasks.
"""

from __future__ import annotations

import csv
import importlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

from ...errors import SpraError


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Records of a local data file, each with where it came from: "train.jsonl:12" (line) or
    "train.parquet[3]" (0-based row, as dataset[3]).

    JSON Lines (.jsonl, .json; a .json file holding one JSON array also works), CSV (.csv, a header
    row; a label of digits is read as a class id), Parquet (.parquet, needs pyarrow), or a directory
    written by `datasets`' save_to_disk (needs datasets; of a DatasetDict its only split, else 'train').
    """
    path = Path(path)
    for unit, n, record in numbered_records(path):
        yield (f"{path.name}:{n}" if unit == "line" else f"{path.name}[{n}]"), record


def check_source(path: str | Path) -> None:
    """A SpraError naming `path` now if it is no data source these readers take (missing, or of an
    unknown format), so that a typo fails before anything heavy loads."""
    _reader(Path(path))


def numbered_records(path: str | Path) -> Iterator[tuple[str, int, dict]]:
    """(unit, number, record) where unit is "line", "row" or "record"; checks every record is an object."""
    path = Path(path)
    empty = True
    for unit, n, record in _reader(path)(path):
        if not isinstance(record, dict):
            raise SpraError(f"{unit} {n}: a record must be an object with named fields, got {json_kind(record)}", path)
        empty = False
        yield unit, n, record
    if empty:
        raise SpraError("no records", path)


def _reader(path: Path):
    if path.is_dir():
        if not ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            raise SpraError("a directory must be one written by datasets' save_to_disk (no state.json in it)", path)
        return _read_dataset_dir
    if not path.exists():
        raise SpraError("no such file or directory", path)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise SpraError(
            f"unknown data format {path.suffix or '(no extension)'!r}: expected .jsonl, .json, .csv, "
            ".parquet or a datasets directory",
            path,
        )
    return reader


def _read_jsonl(path: Path) -> Iterator[tuple[str, int, object]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                raise SpraError(f"line {n}: not UTF-8 text", path) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SpraError(f"line {n}: invalid JSON ({e.msg} at column {e.colno})", path) from None
            yield "line", n, record


def _read_json(path: Path) -> Iterator[tuple[str, int, object]]:
    with open(path, "rb") as f:
        is_array = f.read(4096).decode("utf-8-sig", errors="replace").lstrip().startswith("[")
    if not is_array:
        yield from _read_jsonl(path)
        return
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise SpraError("not UTF-8 text", path) from None
    except json.JSONDecodeError as e:
        raise SpraError(f"line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})", path) from None
    for i, item in enumerate(items):
        yield "record", i, item


def _read_csv(path: Path) -> Iterator[tuple[str, int, object]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                n = reader.line_num
                if None in row:
                    raise SpraError(f"line {n}: more fields than the header has columns", path)
                if None in row.values():
                    raise SpraError(f"line {n}: fewer fields than the header has columns", path)
                # CSV has only strings; a label of digits is a class id, as it would be in JSON.
                if re.fullmatch(r"[0-9]+", row.get("label") or ""):
                    row["label"] = int(row["label"])
                yield "line", n, row
        except UnicodeDecodeError:
            raise SpraError(f"line {reader.line_num + 1}: not UTF-8 text", path) from None
        except csv.Error as e:
            raise SpraError(f"line {reader.line_num}: {e}", path) from None


def _read_parquet(path: Path) -> Iterator[tuple[str, int, object]]:
    pa = _require("pyarrow", "Parquet files", path)
    parquet = importlib.import_module("pyarrow.parquet")
    i = 0
    try:
        for batch in parquet.ParquetFile(path).iter_batches():
            for record in batch.to_pylist():
                yield "row", i, record
                i += 1
    except (pa.ArrowException, OSError) as e:
        raise SpraError(f"not a readable Parquet file ({e})", path) from None


def _read_dataset_dir(path: Path) -> Iterator[tuple[str, int, object]]:
    datasets = _require("datasets", "datasets directories", path)
    try:
        data = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise SpraError(f"cannot load the datasets directory ({e})", path) from None
    if isinstance(data, datasets.DatasetDict):
        if len(data) == 1:
            (data,) = data.values()
        elif "train" in data:
            data = data["train"]
        else:
            raise SpraError(f"a DatasetDict with splits {sorted(data)} and none named 'train'", path)
    for i, record in enumerate(data):
        yield "row", i, record


def _require(module: str, what: str, path: Path):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SpraError(f"reading {what} needs the {module} package (pip install {module})", path) from None


def json_kind(value) -> str:
    """A value's type in JSON words, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
