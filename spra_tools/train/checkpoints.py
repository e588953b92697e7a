"""Training checkpoints (`--checkpoint-dir`): what `--resume` needs to continue a run bit-exactly.

A checkpoint is a directory with `state.safetensors` (the fp32 master deltas, the AdamW moments and
the best evaluated deltas, each keyed `<kind>/<tensor name>`) and `state.json` (the run's settings,
its `RunState` and each tensor's optimizer step count). No pickle: a checkpoint is read with
safetensors and json only. In the checkpoint dir, `last` is a link to the newest checkpoint
(`step-<step>-<random>/`), replaced in one atomic rename, so it is always a complete checkpoint; a
`lock` file held by the running process keeps a second run out of the directory. (Not to be
confused with the base model's checkpoint, `spra_tools.checkpoint`.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SpraError

STATE, TENSORS = "state.json", "state.safetensors"
LAST, LOCK = "last", "lock"


@dataclass
class RunState:
    """Where a run stands after `step` optimizer steps. With the deltas and the optimizer's moments,
    exactly what a checkpoint stores; everything else is rebuilt from the config."""

    step: int = 0  # optimizer steps done
    position: dict | None = None  # Batches.state_dict() after the last completed step
    tokens: int = 0  # trained on so far, all ranks together
    best: dict | None = None  # metrics of the best evaluation so far
    best_step: int | None = None  # the step it was made after
    stale: int = 0  # evaluations since the best one
    best_values: dict[str, torch.Tensor] | None = None  # the deltas at best_step, restored at the end
    baseline: dict | None = None  # metrics of the evaluation before the first step

    def record_eval(self, step: int, metrics: dict, improved: bool, deltas) -> None:
        """Book an evaluation after `step` steps; `deltas` are (name, tensor) pairs to keep when it improved."""
        if improved:
            self.best, self.best_step, self.stale = metrics, step, 0
            self.best_values = {name: d.detach().clone() for name, d in deltas}
        else:
            self.stale += 1

    def bookkeeping(self) -> dict:
        """The JSON-able part (the tensors go to state.safetensors)."""
        return {"step": self.step, "best": self.best, "best_step": self.best_step, "stale": self.stale,
                "tokens": self.tokens, "baseline": self.baseline}  # fmt: skip


@contextlib.contextmanager
def held(directory: str | Path):
    """`directory` (made if missing) for this process alone while the block runs: an exclusive lock on
    its lock file, which the OS releases however the process ends, so a crash leaves no stale lock."""
    import fcntl

    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SpraError(f"cannot use the checkpoint directory ({e.strerror or e})", path) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "unknown"
            raise SpraError(f"another train run (pid {holder}) is using this checkpoint directory; "
                            "give each run its own --checkpoint-dir", path) from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def save(directory: str | Path, settings: dict, state: RunState, sm, optimizer) -> None:
    """A new checkpoint of `sm`'s deltas, `optimizer`'s moments and `state` beside the others; then
    `last` points at it (one atomic rename) and the older ones are removed. Under torch.distributed
    every rank calls it (a sharded model gathers each tensor whole) and rank 0 writes."""
    from safetensors.torch import save_file

    tensors, steps = {}, {}
    for name, delta, *_ in sm.sites():
        moments = optimizer.state.get(delta, {})
        steps[name] = moments.get("step", 0)
        tensors[f"delta/{name}"] = sm.whole(name, delta.detach()).cpu().contiguous()
        if moments:
            tensors[f"exp_avg/{name}"] = sm.whole(name, moments["exp_avg"]).cpu().contiguous()
            tensors[f"exp_avg_sq/{name}"] = sm.whole(name, moments["exp_avg_sq"]).cpu().contiguous()
        if state.best_values is not None:
            tensors[f"best/{name}"] = sm.whole(name, state.best_values[name]).cpu().contiguous()
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    document = {
        "config": settings,
        "bookkeeping": state.bookkeeping(),
        "optimizer_steps": steps,
        "batches": state.position,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # A fresh name, never the one `last` points at (a step may be saved twice: on schedule, then at the end).
    new = Path(tempfile.mkdtemp(prefix=f"step-{state.step:08d}-", dir=directory))
    try:
        save_file(tensors, str(new / TENSORS))
        (new / STATE).write_text(json.dumps(document, indent=1))
        umask = os.umask(0)  # mkdtemp made it private to its owner; a checkpoint gets the usual mode
        os.umask(umask)
        os.chmod(new, 0o777 & ~umask)
        _point_last_at(directory, new.name)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    for old in directory.glob("step-*"):
        if old.name != new.name:
            shutil.rmtree(old, ignore_errors=True)


def _point_last_at(directory: Path, name: str) -> None:
    last = directory / LAST
    if last.is_dir() and not last.is_symlink():  # a plain directory, as earlier versions wrote: set it aside
        os.rename(last, directory / f"step-earlier-{os.getpid()}")
    link = directory / f".{LAST}.{os.getpid()}"
    link.unlink(missing_ok=True)
    os.symlink(name, link)  # relative: the checkpoint dir may move
    os.replace(link, last)


def check_resumable(directory: str | Path, settings: dict) -> None:
    """A SpraError now if `directory`/last is unreadable or was made with other `settings`, so that
    --resume fails before the model loads; nothing (a fresh start) when there is no checkpoint."""
    _read_document(Path(directory) / LAST, settings)


def load(directory: str | Path, settings: dict, sm, optimizer, batches, device) -> RunState | None:
    """Restore a run from `directory`/last into `sm`, `optimizer` and `batches`; None when there is none.

    A checkpoint made with other `settings`, or one that is damaged, is a SpraError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = Path(directory) / LAST
    document = _read_document(where, settings)
    if document is None:
        return None
    try:
        tensors = load_file(str(where / TENSORS))
    except (OSError, ValueError, SafetensorError) as e:
        raise _unreadable(e, where) from None
    try:
        return _restore(document, tensors, sm, optimizer, batches, device)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:  # damaged: the run stops here
        raise SpraError(f"the checkpoint is incomplete or damaged ({e.__class__.__name__}: {str(e)[:100]})",
                        where) from None  # fmt: skip


def _read_document(where: Path, settings: dict) -> dict | None:
    """state.json of the checkpoint at `where`, checked against `settings`; None when there is none."""
    if not (where / STATE).is_file():
        return None
    try:
        document = json.loads((where / STATE).read_text())
    except (OSError, ValueError) as e:
        raise _unreadable(e, where) from None
    if not isinstance(document, dict):
        raise SpraError(f"the checkpoint's {STATE} is not an object", where)
    saved = document.get("config", {})
    changed = sorted(k for k in settings if not isinstance(saved, dict) or saved.get(k) != settings[k])
    if changed:
        raise SpraError(f"the checkpoint was made with different settings ({', '.join(changed)}); "
                        "resume with the same ones", where)  # fmt: skip
    return document


def _unreadable(e: Exception, where: Path) -> SpraError:
    return SpraError(f"cannot read the checkpoint ({e.__class__.__name__}: {str(e)[:100]})", where)


def _restore(document: dict, tensors: dict, sm, optimizer, batches, device) -> RunState:
    best = None
    with torch.no_grad():
        for name, delta, *_ in sm.sites():
            delta.copy_(sm.part(name, tensors[f"delta/{name}"]))
            step = document["optimizer_steps"].get(name, 0)
            if step:
                optimizer.state[delta] = {
                    "step": step,
                    "exp_avg": sm.part(name, tensors[f"exp_avg/{name}"]).to(device, copy=True),
                    "exp_avg_sq": sm.part(name, tensors[f"exp_avg_sq/{name}"]).to(device, copy=True),
                }
            if f"best/{name}" in tensors:
                best = best or {}
                best[name] = sm.part(name, tensors[f"best/{name}"]).to(device, copy=True)
    sm.sync()
    batches.load_state_dict(document["batches"])
    kept = dict(document["bookkeeping"])
    return RunState(step=kept["step"], position=batches.state_dict(), tokens=kept["tokens"], best=kept["best"],
                    best_step=kept["best_step"], stale=kept["stale"], best_values=best,
                    baseline=kept.get("baseline"))  # fmt: skip
