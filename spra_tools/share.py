"""Sharing adapters on the Hugging Face Hub: export a PEFT-like directory, push it, pull it back.

An export directory holds the `.spra` file unchanged, an `adapter_config.json` that tools can read
without parsing the container, and a `README.md` model card whose YAML front matter (`base_model`,
`library_name`, `tags`) lets the Hub list the adapter under its base model. Push and pull go
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


def adapter_config(adapter: Adapter, file_name: str, base: str | None = None) -> dict:
    """The `adapter_config.json` document: what a reader needs without opening the container."""
    supports = [d.support for d in adapter.deltas.values()]
    seeded = bool(supports) and all(isinstance(s, SeededSupport) for s in supports)
    seeds = {s.seed for s in supports} if seeded else set()
    densities = {s.density for s in supports} if seeded else set()
    targets = adapter.provenance.get("targets")
    return {
        "library_name": "spra-tools",
        "format_version": fmt.VERSION,
        "scheme": fmt.sup.SCHEME,
        "base_model": base or adapter.base.get("name"),
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
    if base and _HUB_ID.fullmatch(base):
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
    base_line = f"`{base}`" + (f" (revision `{config['base_revision']}`)" if config["base_revision"] else "")
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
) -> Path:
    """Write `out_dir` (atomically): the `.spra` file byte for byte, `adapter_config.json`, `README.md`.

    `base` overrides the recorded base name, e.g. to name the Hub id of a base that was local.
    """
    adapter_path = Path(adapter_path)
    adapter = Adapter.load(adapter_path, allow_nonfinite=False)
    from .report import describe_adapter

    config = adapter_config(adapter, adapter_path.name, base)
    card = model_card(config, describe_adapter(adapter, adapter_path), license)
    with atomic_path(out_dir, overwrite, directory=True, inputs=(adapter_path,)) as tmp:
        shutil.copyfile(adapter_path, tmp / adapter_path.name)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD).write_text(card, encoding="utf-8")
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
) -> str:
    """Upload an export directory (or a `.spra` file, exported on the fly) to a Hub model repo.

    Creates the repo (and the `revision` branch) when missing; returns the commit URL. The token
    resolves as huggingface_hub always does: `token`, else `HF_TOKEN`, else the stored login.
    """
    import huggingface_hub as hf

    source = Path(adapter_or_dir)
    if not source.exists():
        raise SpraError("no such file or directory", source)
    with tempfile.TemporaryDirectory(prefix="spra-push-") as tmp:
        if source.is_dir():
            _single_spra(source, str(source))
            folder = source
        else:
            folder = export_adapter(source, Path(tmp) / "export", base)
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
