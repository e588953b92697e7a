"""Base checkpoints: lazy reading and atomic, streaming writing of Hugging Face safetensors weights.

A base is a model directory (one ``model.safetensors`` or shards with
``model.safetensors.index.json``), a single ``.safetensors`` file, or a Hub id ``org/name[@rev]``
resolved through huggingface_hub (its cache, ``HF_HUB_OFFLINE``, tokens as usual). Reading
touches one tensor at a time. Writing keeps the input's shard names, tensor order and index,
copies untouched tensors byte for byte (kernel-side copy), and holds one tensor in memory.

Opening a checkpoint and `stream_checkpoint` need no torch (a file apply pays nothing to import
it); the torch views and `write_checkpoint` import it when called.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import format as fmt
from .errors import FormatError, MismatchError, SpraError
from .fsutil import atomic_path
from .hub import REPO_ID, hub_errors

if TYPE_CHECKING:
    import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"
# Weight files of other formats are not copied: they would disagree with the written weights.
_SKIP = re.compile(r"(\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx|tflite)|\.index\.json)$")
_HUB_ID = re.compile(rf"^{REPO_ID}(@[\w./-]+)?$")  # org/name[@revision]


@dataclass
class Checkpoint:
    """A base checkpoint opened for lazy reading."""

    path: Path  # the directory, or the single file
    shards: list[fmt.Container]  # in index order
    index: dict | None  # the parsed index file, if sharded
    name: str  # what the user called it (local path or Hub id)
    revision: str | None

    def __post_init__(self):
        if self.index is None:
            self._where = {n: c for c in self.shards for n in c.tensors}
        else:  # a tensor stored in two shards is read where the index says, as transformers reads it
            home = self.index["weight_map"]
            self._where = {n: c for c in self.shards for n in c.tensors if home.get(n) == Path(c.path).name}
        self._maps: dict[str, np.memmap] = {}

    def indexed_in(self, shard: fmt.Container) -> list[str]:
        """The tensors of `shard` that are read from it (not a stray copy of one indexed elsewhere)."""
        return [n for n in shard.tensors if self._where.get(n) is shard]

    def replacement_problem(self, name: str, shapes: dict[str, tuple[int, ...]]) -> str | None:
        """Why the whole tensor `name` of an adapter (whose dense tensors have `shapes`) cannot replace
        the base tensor of that name, or None. Only the first dimension of a matrix may change (rows:
        added tokens, a head's labels), and a bias's length with the rows of its weight; anything else
        (a norm of another width, a transposed matrix) makes a checkpoint its model cannot load."""
        if name not in self:
            return None
        shape, base = tuple(shapes[name]), self.info(name).shape
        rows_of_weight = shapes.get(name.removesuffix(".bias") + ".weight", (None,))[0]
        if (
            shape == base
            or (len(base) >= 2 and len(shape) == len(base) and shape[1:] == base[1:])
            or (name.endswith(".bias") and len(base) == len(shape) == 1 and shape[0] == rows_of_weight)
        ):
            return None
        return f"dense shape {list(shape)} cannot replace the base's {list(base)}"

    @property
    def is_file(self) -> bool:
        return self.path.is_file()

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> fmt.TensorInfo:
        return self._where[name].tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def mismatch(self, name: str, shape: tuple[int, ...], dtype: str) -> str | None:
        """Why an adapted tensor `name` of `shape` and dtype name `dtype` does not fit this base, or None."""
        if name not in self:
            return "not in the base"
        info = self.info(name)
        if info.shape != tuple(shape):
            return f"shape {list(info.shape)} in the base, {list(shape)} in the adapter"
        if info.dtype != dtype:
            return f"dtype {info.dtype} in the base, {dtype} in the adapter"
        return None

    def check_fits(self, tensors: dict[str, tuple[tuple[int, ...], str]], where: str | os.PathLike) -> None:
        """MismatchError naming the first adapted tensor (name -> (shape, dtype name)) of the adapter
        at `where` that does not fit this base, and how many more do not."""
        problems = {n: why for n, (shape, dtype) in tensors.items() if (why := self.mismatch(n, shape, dtype))}
        if problems:
            name, why = next(iter(problems.items()))
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise MismatchError(f"tensor {name!r}: {why}{more}; is this the adapter's base?", where)

    @property
    def numel(self) -> int:
        return sum(self.info(n).numel for n in self._where)

    def view(self, name: str) -> torch.Tensor:
        """The tensor over a copy-on-write memory map: cheap to gather from; writes never reach the file."""
        container = self._where[name]
        if container.path not in self._maps:
            self._maps[container.path] = np.memmap(container.path, dtype=np.uint8, mode="c")
        return _tensor_over(self._maps[container.path], container.tensors[name])

    def read(self, name: str) -> torch.Tensor:
        """One tensor in fresh memory."""
        return self.view(name).clone()

    def identity(self) -> dict:
        return {"name": self.name, "revision": self.revision, "numel": self.numel}


def open_checkpoint(spec: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    """Open a local directory / .safetensors file, or resolve a Hub id through huggingface_hub."""
    name = os.fspath(spec)
    path = Path(name)
    if not path.exists():
        if not _HUB_ID.match(name) or name.startswith((".", "/")):
            raise SpraError("no such file or directory", name)
        repo, _, rev = name.partition("@")
        revision = revision or rev or None
        path = _download(repo, revision)
    if path.is_file():
        return Checkpoint(path, [fmt.read_container(path)], None, name, revision)
    index_path = path / INDEX
    if index_path.is_file():
        index = _read_index(index_path)
        shard_names = list(dict.fromkeys(index["weight_map"].values()))
        shards = []
        for shard in shard_names:
            if Path(shard).name != shard:
                raise FormatError(f"shard name {shard!r} is not a plain file name", index_path)
            if not (path / shard).is_file():
                raise FormatError(f"shard {shard!r} listed in the index is missing", index_path)
            shards.append(fmt.read_container(path / shard))
        for tensor, shard in index["weight_map"].items():
            if tensor not in shards[shard_names.index(shard)].tensors:
                raise FormatError(f"tensor {tensor!r} is not in its shard {shard!r}", index_path)
        return Checkpoint(path, shards, index, name, revision)
    if (path / SINGLE).is_file():
        return Checkpoint(path, [fmt.read_container(path / SINGLE)], None, name, revision)
    raise SpraError(f"no {SINGLE} or {INDEX} found (only safetensors checkpoints are supported)", path)


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"cannot read the shard index ({e.__class__.__name__})", path) from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise FormatError("shard index has no valid weight_map", path)
    if not isinstance(index.get("metadata") or {}, dict):
        raise FormatError("shard index 'metadata' must be an object", path)
    return index


def _download(repo: str, revision: str | None) -> Path:
    import huggingface_hub as hf

    with hub_errors(repo, revision, offline="not in the local cache and HF_HUB_OFFLINE is set"):
        return Path(
            hf.snapshot_download(
                repo,
                revision=revision,
                ignore_patterns=["*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.gguf", "*.onnx"],
            )
        )


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor."""
    import torch

    t = t.detach().contiguous().cpu().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy() if t.numel() else b"")


def write_checkpoint(
    ckpt: Checkpoint,
    out: str | os.PathLike,
    edit: Callable[[str, torch.Tensor], None] | None = None,
    edited: set[str] = frozenset(),
    dense: dict[str, torch.Tensor] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    config: dict | None = None,
    inputs: tuple = (),
) -> Path:
    """Write `ckpt` to `out`, shard by shard, never holding the model in memory.

    Each shard is first copied byte for byte (in the kernel); then ``edit(name, weight)`` changes
    the tensors named in `edited` in place, `weight` being a view of the output file, so an edit
    that touches a few elements costs only those pages. `dense` tensors replace the base tensor
    of that name (any shape or dtype) or, when the base has none, are added to the last shard.
    `config` entries replace those of the copied ``config.json`` (a directory base that has one).
    `out` appears only when complete; on any failure nothing is left behind. `out` must not be,
    hold or lie inside the base or any of `inputs` (fsutil.check_output).
    """
    dense = dict(dense or {})
    added = {n: t for n, t in dense.items() if n not in ckpt}

    def write_shard(shard: fmt.Container, target: Path, last: bool) -> tuple[int, list[str]]:
        extra = added if last else {}
        total = _copy_shard(shard, target, dense, extra)
        homed = ckpt.indexed_in(shard)  # a stray second copy of a tensor is copied, never edited
        _edit_shard(target, [n for n in homed if n in edited and n not in dense], edit)
        return total, [*homed, *extra]

    return _write_shards(ckpt, out, write_shard, overwrite, progress, config, inputs)


def stream_checkpoint(
    ckpt: Checkpoint,
    out: str | os.PathLike,
    patch: Callable[[str, np.ndarray, int], None],
    patched: set[str],
    overwrite: bool = False,
    progress: bool = False,
    config: dict | None = None,
    inputs: tuple = (),
) -> Path:
    """Write `ckpt` to `out` with the tensors named in `patched` changed on the way (no torch).

    The output has the base's bytes and layout. Every byte of a patched tensor is read once into
    a small buffer, changed there and written once; ``patch(name, elements, first)`` changes one
    chunk in place, `elements` being its raw elements as unsigned integers of the element's width
    (uint16 for BF16 / F16, uint32 for F32) from flat element `first` on. A tensor's chunks come
    in order from one thread; different tensors may be patched at once on different threads (the
    copy is bound by memory copies, which one core does not saturate). Everything else is copied
    in the kernel. `config` entries replace those of the copied ``config.json``, as in
    `write_checkpoint`. `out` appears only when complete; on any failure (an exception from
    `patch` included) nothing is left behind.
    """

    def write_shard(shard: fmt.Container, target: Path, last: bool) -> tuple[int, list[str]]:
        with open(shard.path, "rb", buffering=0) as src, open(target, "wb", buffering=0) as dst:
            jobs, done = [], 0  # bytes of the shard covered so far
            homed = ckpt.indexed_in(shard)
            for t in sorted(shard.tensors.values(), key=lambda t: t.begin):
                if t.name in patched and t.name in homed and t.nbytes:
                    jobs += _copy_jobs(src.fileno(), dst.fileno(), done, t.begin, src.name)
                    jobs.append(functools.partial(_patch_range, src.fileno(), dst.fileno(), t, patch, src.name))
                    done = t.end
            jobs += _copy_jobs(src.fileno(), dst.fileno(), done, shard.file_size, src.name)
            _run_jobs(jobs)
        return shard.file_size - 8 - shard.header_size, homed

    return _write_shards(ckpt, out, write_shard, overwrite, progress, config, inputs)


# Bytes a streamed tensor moves per read and write: small enough to stay in the CPU's cache between
# the two copies (so the write reads it from cache), large enough that system calls and the patch's
# per-chunk work do not count. Measured on a 2-core Xeon: 512 KiB-1 MiB cost least; 2 MiB, 30 % more.
_STREAM_CHUNK = 1 << 19
# Bytes of one kernel-side copy job: pieces small enough to share out between threads.
_COPY_JOB = 16 << 20
# Threads of a stream: memory copies scale to a few cores, not to many.
_STREAM_THREADS = 4


def _copy_jobs(src: int, dst: int, begin: int, end: int, name: str) -> list:
    """Jobs copying bytes [begin, end) of `src` to the same place in `dst`."""
    return [
        functools.partial(_copy_at, src, dst, pos, min(_COPY_JOB, end - pos), name)
        for pos in range(begin, end, _COPY_JOB)
    ]


def _run_jobs(jobs: list) -> None:
    """Run ``job(buffer)`` for every job on a few threads, each with its own buffer. After a failure
    no job starts; the one raised is that of the first job to fail in list order (every job before
    it has run), so errors are the same as in one thread."""
    import threading

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    pending, lock, errors = iter(enumerate(jobs)), threading.Lock(), []

    def work() -> None:
        buffer = bytearray(_STREAM_CHUNK)
        while not errors:
            with lock:
                i, job = next(pending, (None, None))
            if job is None:
                return
            try:
                job(buffer)
            except BaseException as e:  # re-raised on the calling thread
                errors.append((i, e))

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(_STREAM_THREADS, cores, len(jobs)) - 1)]
    for t in threads:
        t.start()
    work()
    for t in threads:
        t.join()
    if errors:
        raise min(errors, key=lambda x: x[0])[1]


def _write_shards(
    ckpt: Checkpoint, out, write_shard, overwrite: bool, progress: bool, config: dict | None, inputs: tuple
) -> Path:
    """The shard loop both writers share: atomic output, shard names kept, side files (with the
    `config` entries), the index.

    ``write_shard(shard, target, last)`` writes one shard and returns (bytes of tensor data,
    names of the tensors in it)."""
    with atomic_path(out, overwrite, directory=not ckpt.is_file, inputs=(ckpt.path, *inputs)) as tmp:
        bar = _progress(sum(c.file_size for c in ckpt.shards), progress)
        try:
            weight_map, total = {}, 0
            for i, shard in enumerate(ckpt.shards):
                target = tmp if ckpt.is_file else tmp / Path(shard.path).name
                size, names = write_shard(shard, target, i == len(ckpt.shards) - 1)
                total += size
                weight_map.update({n: target.name for n in names})
                bar.update(shard.file_size)
            if not ckpt.is_file:
                _copy_side_files(ckpt.path, tmp, {Path(c.path).name for c in ckpt.shards})
                if config and (tmp / CONFIG).is_file():
                    _update_config(tmp / CONFIG, config)
                if ckpt.index is not None:
                    index = dict(ckpt.index)
                    index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
                    index["weight_map"] = weight_map
                    (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise SpraError(f"cannot write the output ({e.strerror or e})", out) from None
        finally:
            bar.close()
    return Path(out)


def _patch_range(src: int, dst: int, info: fmt.TensorInfo, patch, name: str, buffer: bytearray) -> None:
    """Read tensor `info` chunk by chunk into `buffer`, let `patch` change each chunk, write it to
    the same place in `dst`."""
    width = fmt.DTYPES[info.dtype][0]
    uint = np.dtype(f"<u{width}")
    step = len(buffer) // width * width
    for offset in range(info.begin, info.end, step):
        view = memoryview(buffer)[: min(step, info.end - offset)]
        _read_at(src, view, offset, name)
        patch(info.name, np.frombuffer(view, dtype=uint), (offset - info.begin) // width)
        _write_at(dst, view, offset)


def _copy_at(src: int, dst: int, offset: int, length: int, name: str, buffer: bytearray) -> None:
    """Bytes [offset, offset + length) of `src` to the same place in `dst`: in the kernel, or
    through `buffer` where the filesystems cannot (copy_file_range across filesystems)."""
    end = offset + length
    try:
        while offset < end:
            n = os.copy_file_range(src, dst, end - offset, offset, offset)
            if n == 0:
                raise FormatError("file ended early (truncated?)", name)
            offset += n
        return
    except OSError:
        pass
    while offset < end:
        view = memoryview(buffer)[: min(len(buffer), end - offset)]
        _read_at(src, view, offset, name)
        _write_at(dst, view, offset)
        offset += len(view)


def _read_at(fd: int, view: memoryview, offset: int, name: str) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise FormatError("file ended early (truncated?)", name)
        got += n


def _write_at(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)


def _copy_shard(shard: fmt.Container, target: Path, dense: dict, extra: dict) -> int:
    """Copy a shard, replacing `dense` tensors and appending `extra`; returns bytes of tensor data."""
    infos = sorted(shard.tensors.values(), key=lambda t: t.begin)
    with open(shard.path, "rb") as src, open(target, "wb") as dst:
        if not extra and not any(t.name in dense for t in infos):
            _copy_range(src, dst, 0, shard.file_size)
            return shard.file_size - 8 - shard.header_size
        from .dtypes import DTYPE_NAMES

        replaced = {t.name: dense[t.name] for t in infos if t.name in dense}
        specs = [(t.name, t.dtype, t.shape) for t in infos]
        specs = [
            (n, DTYPE_NAMES[replaced[n].dtype], tuple(replaced[n].shape)) if n in replaced else (n, d, sh)
            for n, d, sh in specs
        ]
        specs += [(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in extra.items()]
        dst.write(fmt.container_header(specs, shard.metadata or None))
        total = 0
        for t in infos:
            if t.name in replaced:
                data = tensor_bytes(replaced[t.name])
                dst.write(data)
                total += data.nbytes
            else:
                _copy_range(src, dst, t.begin, t.nbytes)
                total += t.nbytes
        for tensor in extra.values():
            data = tensor_bytes(tensor)
            dst.write(data)
            total += data.nbytes
    return total


def _edit_shard(target: Path, names: list[str], edit) -> None:
    """Run `edit` on tensors of a written shard in place, through a shared memory map."""
    if not names:
        return
    container = fmt.read_container(target)
    mm = np.memmap(target, dtype=np.uint8, mode="r+")
    try:
        for name in names:
            info = container.tensors[name]
            weight = _tensor_over(mm, info)
            edit(name, weight)
            if info.begin % weight.element_size():  # the edit went to an aligned copy
                mm[info.begin : info.end] = np.frombuffer(tensor_bytes(weight), dtype=np.uint8)
    finally:
        del mm  # no msync: like cp, leave write-back to the kernel


def _tensor_over(mm: np.memmap, info: fmt.TensorInfo) -> torch.Tensor:
    """A tensor sharing memory with the mapped bytes (a copy if they are not aligned for the dtype)."""
    import torch

    from .dtypes import TORCH_DTYPES

    dtype = TORCH_DTYPES[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    raw = mm[info.begin : info.end]
    if info.begin % dtype.itemsize:
        raw = raw.copy()
    return torch.from_numpy(raw).view(dtype).reshape(info.shape)


def _copy_range(src, dst, offset: int, length: int) -> None:
    dst.flush()
    src_fd, dst_fd = src.fileno(), dst.fileno()
    pos = offset
    end = offset + length
    try:
        while pos < end:
            n = os.copy_file_range(src_fd, dst_fd, end - pos, pos)
            if n == 0:
                raise FormatError("file ended early (truncated?)", src.name)
            pos += n
        dst.seek(0, os.SEEK_END)
        return
    except OSError:
        pass  # e.g. a filesystem without copy_file_range
    # Fallback for filesystems without copy_file_range.
    src.seek(pos)
    dst.seek(0, os.SEEK_END)
    while pos < end:
        chunk = src.read(min(16 << 20, end - pos))
        if not chunk:
            raise FormatError("file ended early (truncated?)", src.name)
        dst.write(chunk)
        pos += len(chunk)


def _copy_side_files(src: Path, dst: Path, shards: set[str]) -> None:
    """Config, generation config, tokenizer files, chat template...: every top-level file but weights
    (by suffix, and the `shards` the index names, whatever they are called: the written ones)."""
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.startswith(".") and not _SKIP.search(p.name) and p.name not in shards:
            shutil.copy2(p, dst / p.name)


def task_config(tasks: list[dict]) -> dict:
    """The config.json entries that adapters' tasks set, in order (the last that says wins): the
    class that trained the adapter as ``architectures``, a classifier's labels both ways."""
    entries = {}
    for task in tasks:
        task = task or {}
        if isinstance(task.get("architecture"), str):
            entries["architectures"] = [task["architecture"]]
        labels = task.get("id2label")
        if isinstance(labels, dict) and labels and all(str(k).isdigit() for k in labels):
            entries["id2label"] = {str(k): str(v) for k, v in labels.items()}
            entries["label2id"] = {str(v): int(k) for k, v in labels.items()}
    return entries


def _update_config(path: Path, entries: dict) -> None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"cannot read the model config ({e.__class__.__name__})", path) from None
    if not isinstance(config, dict):
        raise FormatError("the model config is not a JSON object", path)
    path.write_text(json.dumps({**config, **entries}, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _progress(total: int, enabled: bool):
    if not enabled:  # no import of tqdm for a quiet run
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, leave=False, desc="writing")


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass
