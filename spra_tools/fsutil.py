"""Atomic outputs: everything is written under a temporary sibling name and renamed when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import SpraError


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty output (unless overwrite) and an unwritable parent directory."""
    path = Path(path)
    if path.exists() and not overwrite:
        if not path.is_dir() or any(path.iterdir()):
            raise SpraError("output exists (use --overwrite to replace it)", path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SpraError("output directory does not exist", parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpraError("output directory is not writable", parent)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False, directory: bool = False):
    """Yield a temporary sibling of `path` (a file path, or a fresh directory) and move it into place
    on success; on any failure the temporary is removed and `path` is left as it was."""
    path = check_output(path, overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise SpraError(f"cannot create a temporary output ({e.strerror})", path.parent) from None
    target = tmp if directory else tmp / path.name
    try:
        yield target
        if directory:  # mkdtemp made it private to its owner; an output gets the usual mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(target, 0o777 & ~umask)
        _replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(src: Path, dst: Path) -> None:
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
        try:
            os.rename(src, dst)
        except OSError:
            os.rename(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


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
