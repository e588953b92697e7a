"""Sharing adapters on the Hugging Face Hub: export a PEFT-like directory, push it, pull it back.

An export directory holds the `.spra` file, an `adapter_config.json` that tools can read without
parsing the container, and a `README.md` model card whose YAML front matter (`base_model`,
`library_name`, `tags`) lets the Hub list the adapter under its base model. What is shared names no
local path: wherever the adapter recorded one (its base, its data files, its parents), the export
keeps the last component only (`/home/me/data/train.jsonl` -> `train.jsonl`), in all three files
(the `.spra` file is rewritten with the same tensors when it has such paths, else copied byte for
byte). `base_model` is a Hub id: `--base`, else the recorded base when it is one or a Hub cache
snapshot of one (`.../models--org--name/snapshots/<rev>`); a local base without one is named by
its directory name, with a warning and no `base_model`. A checkpoint's own `_name_or_path` is not
trusted for it: it names the model the checkpoint was made from (all-MiniLM-L6-v2's says
`nreimers/MiniLM-L6-H384-uncased`), not the checkpoint. Push and pull go
through huggingface_hub (its endpoint, tokens and offline switch work as usual); every Hub failure
becomes one `SpraError` line naming the repository, and a pull appears at its output only when the
download is complete and the adapter in it reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from . import format as fmt
from .adapter import Adapter
from .errors import SpraError
from .fsutil import atomic_path
from .hub import REPO_ID, hub_errors
from .support import SeededSupport

CONFIG = "adapter_config.json"
CARD = "README.md"
TAGS = ["spra-tools", "sparta", "sparse-adapter", "peft"]
# Anything but a Hub model id (a local path, say) is not a `base_model` the Hub can link.
_HUB_ID = re.compile(REPO_ID)
_HUB_SNAPSHOT = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/([^/]+)")  # huggingface_hub's cache layout


def _is_local_path(text: str) -> bool:
    """A string that names a place on this machine: absolute, ~ or ./-relative, or existing here."""
    return os.path.isabs(text) or text.startswith(("~", "./", "../")) or os.path.exists(text)


def _hub_base(name: str | None) -> tuple[str | None, str | None]:
    """(Hub id, revision) that `name` stands for, or (None, None): a Hub id (`org/name[@rev]`) that is
    not a local path, or a local path into huggingface_hub's cache."""
    if not name:
        return None, None
    found = _HUB_SNAPSHOT.search(Path(name).absolute().as_posix()) if _is_local_path(name) else None
    if found:
        return f"{found[1]}/{found[2]}", found[3]
    repo, _, revision = name.partition("@")
    if not _is_local_path(name) and _HUB_ID.fullmatch(repo):
        return repo, revision or None
    return None, None


def _without_local_paths(value):
    """`value` (JSON-like) with every local path cut to its last component."""
    if isinstance(value, dict):
        return {k: _without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(v) for v in value]
    if isinstance(value, str) and _is_local_path(value):
        return Path(value).expanduser().name or value
    return value


def shareable(adapter: Adapter, base: str | None = None) -> tuple[Adapter, str | None]:
    """The adapter as it may be shared — no local paths, its base named by Hub id where one is known
    (`base` first, else the recorded one; module docstring) — and a warning when none is."""
    recorded = adapter.base.get("name")
    out_base, warning = dict(adapter.base), None
    for name in (base, recorded):
        hub_id, revision = _hub_base(name)
        if hub_id is not None:
            if revision is None and name == recorded:
                revision = adapter.base.get("revision")
            out_base.update(name=hub_id, revision=revision)
            break
    else:
        local = base or recorded
        if local:
            out_base["name"] = _without_local_paths(local)
            warning = (f"the base {local!r} is a local checkpoint with no Hub id: the model card names no "
                       "base_model (give --base ORG/NAME, its Hub id, to link it)")  # fmt: skip
    provenance = _without_local_paths(adapter.provenance)
    return replace(adapter, base=out_base, provenance=provenance), warning


def adapter_config(adapter: Adapter, file_name: str) -> dict:
    """The `adapter_config.json` document of a `shareable` adapter: what a reader needs without
    opening the container."""
    supports = [d.support for d in adapter.deltas.values()]
    seeded = bool(supports) and all(isinstance(s, SeededSupport) for s in supports)
    seeds = {s.seed for s in supports} if seeded else set()
    densities = {s.density for s in supports} if seeded else set()
    targets = adapter.provenance.get("targets")
    return {
        "library_name": "spra-tools",
        "format_version": fmt.VERSION,
        "scheme": fmt.sup.SCHEME,
        "base_model": _hub_base(adapter.base.get("name"))[0],
        "base_revision": adapter.base.get("revision"),
        "method": "sparta",
        "seed": seeds.pop() if len(seeds) == 1 else None,
        "density": densities.pop() if len(densities) == 1 else None,
        "targets": list(targets) if isinstance(targets, list) else sorted(adapter.deltas),
        "num_values": adapter.num_values,
        "adapter_file": file_name,
    }


def model_card(config: dict, described: dict, license: str | None = None) -> str:
    """A Hub model card: YAML front matter (values written as JSON, which YAML reads) and a body."""
    base = config["base_model"]
    front = []
    if base:
        front.append(f"base_model: {json.dumps(base)}")
    front.append("library_name: spra-tools")
    if license:
        front.append(f"license: {json.dumps(license)}")
    front.append("tags:\n" + "".join(f"- {t}\n" for t in TAGS).rstrip("\n"))
    name = config["adapter_file"]
    stem = Path(name).stem
    bpv = described["bytes_per_value"]
    frac = described["fraction_of_model"]
    rows = [
        ("file", f"`{name}`, {described['file_bytes']:,} bytes"),
        ("bytes per value", f"{bpv:.2f}" if bpv else "-"),
        ("values", f"{described['values']:,}"),
        ("tensors", f"{described['tensors']}"),
        ("density of the targeted tensors", f"{described['density_of_targeted']:.4%}"),
        ("fraction of the model", f"{frac:.4%}" if frac else "-"),
        ("support", described["support"]),
    ]
    table = "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    if base:
        base_line = f"`{base}`" + (f" (revision `{config['base_revision']}`)" if config["base_revision"] else "")
    else:
        local = (described["base"] or {}).get("name")
        base_line = f"a local checkpoint{f' (`{local}`)' if local else ''}, with no Hub id recorded"
    return f"""---
{chr(10).join(front)}
---

# {stem}

A [SpaRTA](https://arxiv.org/abs/2502.15975) sparse adapter in the `.spra` format of spra-tools:
a random subset of the base model's own weights, fine-tuned, stored as {"a seed and the trained values" if config["seed"] is not None else "indices and values"}.

Base model: {base_line}.

## Size

{table}
## Provenance

```json
{json.dumps(described["provenance"], indent=2, sort_keys=True)}
```

## How to use

```bash
spra-tools pull REPO -o DIR
spra-tools apply BASE DIR/{name} -o merged/
```

```python
import spra_tools

model = spra_tools.load_model(BASE, "DIR/{name}")  # the base with the adapter attached
# or, on a model already loaded:
spra_tools.attach(model, "DIR/{name}")
```

`REPO` is this repository's id, `DIR` any local directory, `BASE` the base model above.
"""


def export_adapter(
    adapter_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    base: str | None = None,
    overwrite: bool = False,
    license: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Write `out_dir` (atomically): the adapter, `adapter_config.json` and `README.md`, naming no
    local path (module docstring).

    `base` names the base's Hub id (e.g. of a base that was local). `warn` receives what the user
    should know (a base with no Hub id); by default it goes to `warnings.warn`.
    """
    adapter_path = Path(adapter_path)
    recorded = Adapter.load(adapter_path, allow_nonfinite=False)
    adapter, warning = shareable(recorded, base)
    from .report import describe_adapter

    with atomic_path(out_dir, overwrite, directory=True, inputs=(adapter_path,)) as tmp:
        spra = tmp / adapter_path.name
        if (adapter.base, adapter.provenance) == (recorded.base, recorded.provenance):
            shutil.copyfile(adapter_path, spra)
        else:
            adapter.save(spra)
        config = adapter_config(adapter, adapter_path.name)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD).write_text(model_card(config, describe_adapter(adapter, spra), license), encoding="utf-8")
    if warning:  # once written: a refused output is the one thing to say
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(warning)
    return Path(out_dir)


def push(
    adapter_or_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    base: str | None = None,
    endpoint: str | None = None,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
) -> str:
    """Upload an export directory (or a `.spra` file, exported on the fly) to a Hub model repo.

    Creates the repo (and the `revision` branch) when missing; returns the commit URL. The token
    resolves as huggingface_hub always does: `token`, else `HF_TOKEN`, else the stored login.
    """
    import huggingface_hub as hf

    source = Path(adapter_or_dir)
    if not source.exists():
        raise SpraError("no such file or directory", source)
    notes: list[str] = []  # said once the push went through: a failure is the one thing to say
    with tempfile.TemporaryDirectory(prefix="spra-push-") as tmp:
        if source.is_dir():
            _single_spra(source, str(source))
            folder = source
        else:
            folder = export_adapter(source, Path(tmp) / "export", base, warn=notes.append)
        api = hf.HfApi(endpoint=endpoint, token=token)
        with hub_errors(repo_id, revision, endpoint), _progress_bars(progress):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                commit_message=f"Upload {_single_spra(folder, str(folder)).name} with spra-tools",
            )
    for note in notes:
        (warn or (lambda m: warnings.warn(m, stacklevel=2)))(note)
    return getattr(info, "commit_url", None) or getattr(info, "oid", None) or str(info)


def pull(
    repo_id: str,
    out_dir: str | os.PathLike,
    revision: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
    endpoint: str | None = None,
    progress: bool = False,
) -> Path:
    """Download a Hub repo holding one `.spra` file into `out_dir`; the adapter is read before the
    directory appears, so a corrupt or incomplete download leaves nothing behind."""
    import huggingface_hub as hf

    with atomic_path(out_dir, overwrite, directory=True) as tmp:
        with hub_errors(repo_id, revision, endpoint), _progress_bars(progress):
            # The names are checked before anything is written, and the download is pinned to the
            # commit whose names were checked.
            info = hf.HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision)
            names = [s.rfilename for s in info.siblings or []]
            for name in names:
                _check_repo_file_name(name, repo_id)
            hf.snapshot_download(
                repo_id, revision=info.sha, token=token, local_dir=tmp, endpoint=endpoint, allow_patterns=names
            )
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
        spra = _single_spra(tmp, repo_id)
        try:
            Adapter.load(spra)
        except SpraError as e:
            raise SpraError(f"downloaded {spra.name} is not a valid adapter ({e.message})", repo_id) from None
    return Path(out_dir)


def _check_repo_file_name(name: str, repo_id: str) -> None:
    """Refuse a Hub file name that would land outside the download folder or that cannot be a plain
    relative path on every platform: a `..` segment, an absolute, drive or UNC path, a backslash, a
    control character. Checked before anything is downloaded, whatever huggingface_hub checks."""
    segments = name.split("/")
    if (
        not name
        or ".." in segments
        or "" in segments
        or name.startswith("/")
        or "\\" in name
        or re.search(r"[\x00-\x1f\x7f]", name)
        or re.match(r"[A-Za-z]:", name)
    ):
        raise SpraError(f"the repository holds a file named {name!r}, which is not a safe relative path", repo_id)


@contextlib.contextmanager
def _progress_bars(show: bool):
    """huggingface_hub's bars only where the CLI shows its own (a terminal, not --quiet)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if show or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _single_spra(folder: Path, where: str) -> Path:
    found = sorted(folder.glob("*.spra"))
    if len(found) != 1:
        what = "no .spra file" if not found else f"{len(found)} .spra files ({', '.join(p.name for p in found)})"
        raise SpraError(f"expected exactly one .spra file, found {what}", where)
    return found[0]
