"""Atomic outputs, and the one rule for where an output may go.

Every command that writes calls `check_output` before its slow work and writes through
`atomic_path`, which checks again:

* an output is never an input, nor a directory that holds an input, nor a path inside one (so an
  ``--overwrite`` cannot delete a base, its shards or an adapter being read);
* everything is written under a hidden temporary sibling named after the output and the writing
  process (``.NAME.spra-tmp-PID-XXXX``) and moved into place when complete;
* without ``--overwrite`` the move never replaces anything (a hard link for a file, an exclusive
  ``mkdir`` claim for a directory), so of two runs racing to one new output the second fails;
* with ``--overwrite`` a directory is swapped in two renames through ``.NAME.spra-old-PID``; the
  next run towards the same output puts such a copy back if its process died between the renames,
  and removes the temporaries of dead processes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import SpraError, shown

_TMP, _OLD = "spra-tmp", "spra-old"
# Errors of the output's file system, not of an input being read.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def check_output(path: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """The absolute output path, after cleaning up after dead writers of it (`recover_stale`) and
    refusing: an output that is, holds or lies inside one of
    `inputs` (paths that do not exist locally, e.g. Hub ids, are skipped); an existing non-empty
    output (unless overwrite); an unwritable parent directory."""
    path = Path(os.path.abspath(path))
    recover_stale(path)
    real = path.resolve()
    for given in inputs:
        if given is None or not os.path.exists(given):
            continue
        source = Path(given).resolve()
        if real == source or source in real.parents or real in source.parents:
            how = "is" if real == source else ("lies inside" if source in real.parents else "contains")
            raise SpraError(f"output {how} the input {shown(given)} (choose another output)", path)
    if path.exists() and not overwrite:
        if not path.is_dir() or any(path.iterdir()):
            raise SpraError("output exists (use --overwrite to replace it)", path)
    parent = path.parent
    if not parent.is_dir():
        raise SpraError("output directory does not exist", parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpraError("output directory is not writable", parent)
    return path


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike,
    overwrite: bool = False,
    directory: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
):
    """Yield a temporary sibling of `path` (a file path, or a fresh directory) and move it into place
    on success; on any failure the temporary is removed and `path` is left as it was. An error of the
    output's file system (disk full, read-only) names `path`, not the temporary."""
    path = check_output(path, overwrite, inputs)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_TMP}-{os.getpid()}-", dir=path.parent))
    except OSError as e:
        raise SpraError(f"cannot create a temporary output ({e.strerror})", path.parent) from None
    target = tmp if directory else tmp / path.name
    try:
        yield target
        if directory:  # mkdtemp made it private to its owner; an output gets the usual mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(target, 0o777 & ~umask)
        _publish(target, path, overwrite)
    except OSError as e:
        inside = e.filename is not None and str(tmp) in os.fspath(e.filename)
        if not inside and e.errno not in _OUTPUT_ERRNOS:
            raise
        raise SpraError(f"cannot write the output ({e.strerror or e})", path) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(src: Path, dst: Path, overwrite: bool) -> None:
    if not overwrite:
        _publish_new(src, dst)
    elif dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.{_OLD}-{os.getpid()}")
        os.rename(dst, old)
        try:
            os.rename(src, dst)
        except OSError:
            os.rename(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _publish_new(src: Path, dst: Path) -> None:
    """Move `src` to `dst` without replacing anything that appeared there meanwhile (an empty
    directory counts as no output)."""
    with contextlib.suppress(OSError):  # absent, not a directory, or not empty: left as it is
        if dst.is_dir() and not dst.is_symlink():
            os.rmdir(dst)  # fails unless empty
    try:
        if src.is_dir():
            os.mkdir(dst)  # the claim: exactly one run creates it
            os.rename(src, dst)  # replaces only the empty directory claimed just now
        else:
            os.link(src, dst)
    except FileExistsError:
        raise SpraError("output appeared while this run was writing (another run?); nothing was written", dst) from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def recover_stale(path: str | os.PathLike) -> None:
    """Clean up after writers of `path` that died: remove their temporaries; put back an output that
    an interrupted ``--overwrite`` swap left only under its hidden old name."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:{_TMP}-(\d+)-.*|{_OLD}-(\d+))")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or _alive(int(m.group(1) or m.group(2))):
            continue
        if m.group(2) and not os.path.lexists(path):
            with contextlib.suppress(OSError):  # if it cannot go back, it stays where it is
                os.rename(entry, path)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def read_yaml(path: str | os.PathLike, what: str):
    """The YAML document at `path` (safe_load); unreadable or invalid YAML is one SpraError line
    that names `what` the file is ("the config", "recipe")."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise SpraError(f"cannot read {what} ({e.strerror})", path) from None
    except yaml.YAMLError as e:
        raise SpraError(f"{what} is not valid YAML ({str(e).splitlines()[0]})", path) from None


def human_size(n: float) -> str:
    """A byte count for people: "812 B", "3.4 MiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
