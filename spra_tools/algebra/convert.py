"""Interop: read and write the peft-sparta adapter layout; turn a PEFT LoRA adapter into a sparse one.

`convert_files` is the `convert` command: it tells the source layout by the files present
(`detect_source`) and the base by what the source records, then reads and writes.

peft-sparta (pip ``peft-sparta``) stores an adapter as a directory:

* ``sparse_deltas.safetensors``: ``indices.<param>`` int32 [nnz, ndim] (row-major ``nonzero()``
  order) and ``deltas.<param>`` fp32 [nnz], one pair for *every* parameter of the model it adapted
  (empty pairs for untouched ones: its loader looks each parameter up and fails on a missing one);
  ``<param>`` is a ``named_parameters()`` name of that model (``model.layers.0.self_attn.v_proj.weight``).
  An older form is ``sparse_deltas.pt``, a pickled ``{"indices": {...}, "deltas": {...}}``.
* ``config.json``: the model config plus ``sparta_pretrained_model`` (the base's name or path).
* for sequence classification: ``head_init.safetensors`` (``head`` [labels, hidden]) with a full
  ``deltas.score.weight``; with added tokens, ``new_embeddings_init.safetensors`` (``new_embeddings``
  [added, hidden]) appended to the input embeddings before the deltas apply.

Its loaders merge with ``param[idx] = (param[idx].float() + delta.float()).to(param.dtype)``: our
apply rule ``cast(fp32(w) + fp32(v))`` exactly, so the two agree bit for bit on any base dtype. Its
loaders always load the base in bf16, though; an adapter trained on an fp32 base therefore lands
on ``bf16(w)`` there (``bf16(fp32(bf16(w)) + v)``), not on ``cast(w + v)`` as ours does.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from .. import ops
from ..adapter import Adapter, TensorDelta, explicit_delta
from ..checkpoint import Checkpoint, open_checkpoint
from ..errors import FormatError, SpraError
from ..fingerprint import fingerprints
from ..format import FLOAT_DTYPES
from ..fsutil import atomic_path
from ..names import NameMap
from ..support import ExplicitSupport, seeded_count
from .checks import checked_density

DELTAS_ST = "sparse_deltas.safetensors"
DELTAS_PT = "sparse_deltas.pt"
CONFIG = "config.json"
HEAD = "score.weight"  # peft-sparta's fully trained classification head
_PREFIXES = ("base_model.model.", "base_model.", "model.", "transformer.")
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
SOURCES = ("spra", "peft-sparta", "lora")  # what `convert` reads
TARGETS = ("spra", "peft-sparta")  # what it writes


# ---------------------------------------------------------------------------------------------- names


def match_name(name: str, base: Checkpoint, where: str | os.PathLike) -> str:
    """The base tensor `name` refers to: itself, or the one name left after stripping/adding wrapper
    prefixes (``base_model.model.``, ``model.``...) and a missing ``.weight``; refuses none or several."""
    if name in base:
        return name
    stems = {name}
    for _ in range(3):  # wrappers nest: base_model.model.model.layers...
        stems |= {s[len(p) :] for s in stems for p in _PREFIXES if s.startswith(p)}
    variants = {p + s for s in stems for p in ("", "model.", "transformer.")}
    variants |= {v + ".weight" for v in variants}
    found = sorted(v for v in variants if v in base)
    if len(found) == 1:
        return found[0]
    if not found:
        raise SpraError(f"parameter {name!r} matches no tensor of the base {base.name!r}", where)
    raise SpraError(f"parameter {name!r} matches several base tensors {found}", where)


def _causal_lm_names(base: Checkpoint | None) -> NameMap | None:
    """The base's tensor names against the parameter names of the causal-LM model transformers builds
    from its config (peft-sparta keys its files by those: GPT-NeoX's checkpoint ``embed_out`` is
    ``lm_head`` there), from a model on the meta device (no weights read); None when the base has
    no config transformers can build a causal LM from."""
    if base is None or base.is_file or not (base.path / CONFIG).is_file():
        return None
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(base.path)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return NameMap(model, base.names())


# ----------------------------------------------------------------------------------------- peft-sparta


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    try:
        return safetensors.torch.load_file(os.fspath(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types, OSError, ValueError...
        raise FormatError(f"cannot read the safetensors file ({e.__class__.__name__}: {e})", path) from None


def _load_pt(path: Path):
    try:
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refusals and corrupt zips raise many types
        raise FormatError(f"cannot read the .pt file ({e.__class__.__name__})", path) from None


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpraError("missing (not a peft adapter directory?)", path) from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"cannot read JSON ({e.__class__.__name__})", path) from None
    if not isinstance(doc, dict):
        raise FormatError("must hold a JSON object", path)
    return doc


def _read_sparse_deltas(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Path]:
    st, pt = path / DELTAS_ST, path / DELTAS_PT
    if st.is_file():
        indices, deltas = {}, {}
        for key, t in _load_safetensors(st).items():
            kind, _, name = key.partition(".")
            if kind not in ("indices", "deltas") or not name:
                raise FormatError(f"unexpected tensor {key!r} (need indices.<name> / deltas.<name>)", st)
            (indices if kind == "indices" else deltas)[name] = t
        return indices, deltas, st
    if pt.is_file():
        doc = _load_pt(pt)
        ok = isinstance(doc, dict) and all(isinstance(doc.get(k), dict) for k in ("indices", "deltas"))
        if not ok or not all(isinstance(t, torch.Tensor) for k in ("indices", "deltas") for t in doc[k].values()):
            raise FormatError("expected {'indices': {name: tensor}, 'deltas': {name: tensor}}", pt)
        return dict(doc["indices"]), dict(doc["deltas"]), pt
    raise SpraError(f"no {DELTAS_ST} or {DELTAS_PT} found (not a peft-sparta adapter?)", path)


def _load_init(path: Path, stem: str, key: str) -> torch.Tensor | None:
    st, pt = path / f"{stem}_init.safetensors", path / f"{stem}_init.pt"
    if st.is_file():
        tensors = _load_safetensors(st)
        if key not in tensors:
            raise FormatError(f"no tensor {key!r}", st)
        t, where = tensors[key], st
    elif pt.is_file():
        t, where = _load_pt(pt), pt
    else:
        return None
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
        raise FormatError(f"{key!r} must be a 2-D float tensor", where)
    return t


def _flat_sorted(
    idx: torch.Tensor, vals: torch.Tensor, shape: tuple[int, ...], name: str, where: Path
) -> tuple[np.ndarray, torch.Tensor]:
    """[nnz, ndim] indices and [nnz] values -> sorted unique flat int64 indices and fp32 values."""
    if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 2 or idx.shape[1] != len(shape):
        raise FormatError(
            f"indices of {name!r} must be int32/int64 [nnz, {len(shape)}], got {idx.dtype} {list(idx.shape)}", where
        )
    if not vals.is_floating_point() or vals.dim() != 1 or vals.shape[0] != idx.shape[0]:
        raise FormatError(
            f"deltas of {name!r} must be float [{idx.shape[0]}], got {vals.dtype} {list(vals.shape)}", where
        )
    idx = idx.to(torch.int64)
    bound = torch.tensor(shape, dtype=torch.int64)
    if idx.numel() and bool(((idx < 0) | (idx >= bound)).any()):
        raise FormatError(f"indices of {name!r} fall outside its shape {list(shape)}", where)
    strides = torch.tensor([math.prod(shape[d + 1 :]) for d in range(len(shape))], dtype=torch.int64)
    flat = (idx * strides).sum(1) if len(shape) else torch.zeros(idx.shape[0], dtype=torch.int64)
    order = torch.argsort(flat, stable=True)
    flat, values = flat[order], vals.to(torch.float32)[order]  # bf16/fp16 -> fp32 is exact
    if flat.numel() > 1 and bool((flat[1:] == flat[:-1]).any()):
        raise FormatError(f"indices of {name!r} repeat an element", where)
    return flat.numpy(), values


def read_peft_sparta(path: str | os.PathLike, base: Checkpoint) -> Adapter:
    """A peft-sparta adapter directory as an Adapter over `base` (names mapped to the base's).

    Values are the stored fp32 deltas unchanged, so applying the result equals peft-sparta's own
    merge bit for bit (module docstring). A classification head (``head_init`` + ``score.weight``)
    becomes the dense fp32 tensor ``score.weight`` = fp32(head_init) + deltas, as its loader builds
    it; added tokens (``new_embeddings_init``) become a dense, enlarged input-embedding tensor with
    that tensor's deltas folded in.
    """
    path = Path(path)
    if not path.is_dir():
        raise SpraError("not a directory (a peft-sparta adapter is a directory)", path)
    config = _read_json(path / CONFIG)
    indices, deltas, where = _read_sparse_deltas(path)
    if set(indices) != set(deltas):
        odd = sorted(set(indices) ^ set(deltas))[0]
        raise FormatError(f"parameter {odd!r} has indices without deltas or deltas without indices", where)
    head = _load_init(path, "head", "head")
    new_tokens = _load_init(path, "new_embeddings", "new_embeddings")

    adapter_deltas, dense = {}, {}
    embed_name = None
    if new_tokens is not None:
        found = [n for n in base.names() if n.endswith(_EMBEDDINGS)]
        if len(found) != 1:
            raise SpraError(f"cannot tell the base's input embeddings among {found}", path)
        embed_name = found[0]
    names = _causal_lm_names(base)
    for name in sorted(indices):
        idx, vals = indices[name], deltas[name]
        if name == HEAD and head is not None:
            if vals.numel() != head.numel():
                raise FormatError(f"deltas of {HEAD!r} must cover head_init {list(head.shape)}", where)
            dense[HEAD] = head.float() + vals.float().view(head.shape)
            continue
        stored = None if names is None else names.checkpoint_name(name)
        target = stored if stored in base else match_name(name, base, where)
        info = base.info(target)
        w = base.view(target)
        if target == embed_name:
            w = torch.cat([w, new_tokens.to(w.dtype)])
        shape = tuple(w.shape)
        flat, values = _flat_sorted(idx, vals, shape, name, where)
        if target == embed_name:
            out = w.clone().reshape(-1)
            out[flat] = (out[flat].float() + values).to(out.dtype)
            dense[target] = out.reshape(shape)
            continue
        if flat.size == 0:
            continue
        if target in adapter_deltas:
            raise FormatError(f"parameters map twice to the base tensor {target!r}", where)
        if info.dtype not in FLOAT_DTYPES:
            raise SpraError(f"base tensor {target!r} has dtype {info.dtype}; only float weights can be adapted", where)
        gathered = ops.gather(w, torch.from_numpy(flat))
        adapter_deltas[target] = explicit_delta(target, shape, w.dtype, flat, values, gathered)
    task = {}
    if isinstance(config.get("id2label"), dict) and head is not None:
        task = {"labels": [config["id2label"][k] for k in sorted(config["id2label"], key=int)]}
    provenance = {
        "method": "convert",
        "from": "peft-sparta",
        "path": str(path),
        "file": where.name,
        "sparta_pretrained_model": config.get("sparta_pretrained_model"),
    }
    return Adapter(adapter_deltas, dense, base.identity(), task, provenance, exact=True)


def write_peft_sparta(
    adapter: Adapter,
    out_dir: str | os.PathLike,
    base_name: str,
    base: Checkpoint | None = None,
    overwrite: bool = False,
    inputs: tuple = (),
) -> Path:
    """Write `adapter` as a peft-sparta directory whose ``sparta_pretrained_model`` is `base_name`.

    peft-sparta's loaders look up every parameter of the model, so every float tensor of the base
    gets an entry (empty where the adapter does not touch it), under the name its causal-LM model
    gives the tensor (`_causal_lm_names`): pass `base`, or a `base_name` that is a local checkpoint. Its ``config.json`` is copied in when the base is a directory. Values
    are written in fp32 (exact for bf16/fp16/fp32 values). A dense ``score.weight`` is written as
    peft-sparta's classification head (``head_init`` + zero deltas); other dense tensors have no
    peft-sparta form and are refused.
    """
    import safetensors.torch

    out_dir = Path(out_dir)
    if base is None and Path(base_name).exists():
        base = open_checkpoint(base_name)
    other = sorted(n for n in adapter.dense if n != HEAD)
    if other:
        raise SpraError(f"dense tensor {other[0]!r} has no peft-sparta form (only a {HEAD!r} head)", out_dir)
    tensors: dict[str, torch.Tensor] = {}
    names = list(adapter.deltas)
    if base is not None:
        names += [
            n for n in base.names() if n not in adapter.deltas and n != HEAD and base.info(n).dtype in FLOAT_DTYPES
        ]
    loaded = _causal_lm_names(base)
    for name in names:
        key = name if loaded is None else loaded.model_name(name) or name  # as the loader's model names it
        if name in adapter.deltas:
            d: TensorDelta = adapter.deltas[name]
            flat = d.indices().to(torch.int64)
            coords = torch.stack(torch.unravel_index(flat, d.shape), 1) if d.shape else flat[:, None][:, :0]
            values = d.values.to(torch.float32)
        else:
            coords = torch.empty((0, len(base.info(name).shape)), dtype=torch.int64)
            values = torch.empty(0, dtype=torch.float32)
        tensors[f"indices.{key}"] = coords.to(torch.int32).contiguous()
        tensors[f"deltas.{key}"] = values.contiguous()
    config = {}
    if base is not None and not base.is_file and (base.path / CONFIG).is_file():
        config = _read_json(base.path / CONFIG)
    config["sparta_pretrained_model"] = base_name
    head = adapter.dense.get(HEAD)
    if head is not None:
        labels = adapter.task.get("labels") or [f"LABEL_{i}" for i in range(head.shape[0])]
        if len(labels) != head.shape[0]:
            raise SpraError(f"{len(labels)} task labels for a head of {head.shape[0]} rows", out_dir)
        config["id2label"] = {str(i): str(lab) for i, lab in enumerate(labels)}
        config["label2id"] = {str(lab): i for i, lab in enumerate(labels)}
        config["problem_type"] = "single_label_classification"
        tensors[f"indices.{HEAD}"] = torch.ones(head.shape).nonzero().to(torch.int32).contiguous()
        tensors[f"deltas.{HEAD}"] = torch.zeros(head.numel(), dtype=torch.float32)
    with atomic_path(out_dir, overwrite, directory=True, inputs=inputs) as tmp:
        try:
            safetensors.torch.save_file(tensors, os.fspath(tmp / DELTAS_ST))
            if head is not None:
                safetensors.torch.save_file({"head": head.contiguous()}, os.fspath(tmp / "head_init.safetensors"))
            (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise SpraError(f"cannot write ({e.strerror})", out_dir) from None
    return out_dir


# ------------------------------------------------------------------------------------------------ LoRA

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B|embedding_A|embedding_B)(\.[^.]+)?(\.weight)?$")


def _pattern_value(module: str, pattern: dict, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_to_sparse(lora_dir: str | os.PathLike, base: Checkpoint, density: float | None = None) -> Adapter:
    """A sparse adapter for the update ΔW = scale · B @ A of each LoRA target of `base`.

    scale is lora_alpha / r (lora_alpha / sqrt(r) with use_rslora); ΔW is transposed for
    fan_in_fan_out (GPT-2 Conv1D) and for embedding LoRA, computed in fp32 in the order PEFT
    computes it. Without `density` every nonzero element of ΔW is kept (fp32 values); with it each
    tensor keeps its ``floor(density * numel)`` largest |ΔW|. The retained fraction of ||ΔW||² per
    tensor and overall is in ``provenance["retained"]`` / ``provenance["retained_total"]``.
    """
    lora_dir = Path(lora_dir)
    if not lora_dir.is_dir():
        raise SpraError("not a directory (a PEFT adapter is a directory)", lora_dir)
    cfg_path = lora_dir / "adapter_config.json"
    cfg = _read_json(cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise SpraError(f"peft_type {cfg.get('peft_type')!r} is not LORA", cfg_path)
    if cfg.get("use_dora"):
        raise SpraError("DoRA adapters are not supported (the update is not B @ A alone)", cfg_path)
    try:
        r_default, alpha_default = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise FormatError("needs integer 'r' and numeric 'lora_alpha'", cfg_path) from None
    st, binf = lora_dir / "adapter_model.safetensors", lora_dir / "adapter_model.bin"
    if st.is_file():
        weights, where = _load_safetensors(st), st
    elif binf.is_file():
        weights, where = _load_pt(binf), binf
        if not isinstance(weights, dict):
            raise FormatError("expected a state dict", binf)
    else:
        raise SpraError("no adapter_model.safetensors or adapter_model.bin found", lora_dir)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in weights.items():
        m = _LORA_KEY.match(key)
        if not m:
            raise SpraError(f"tensor {key!r} is not a LoRA A/B matrix (modules_to_save, biases... unsupported)", where)
        pairs.setdefault(m["module"], {})[m["part"]] = t
    if density is not None:
        checked_density(density)

    deltas, retained = {}, {}
    kept_energy = total_energy = 0.0
    for module in sorted(pairs):
        parts = pairs[module]
        embedding = "embedding_A" in parts or "embedding_B" in parts
        a, b = (parts.get("embedding_A"), parts.get("embedding_B")) if embedding else (parts.get("A"), parts.get("B"))
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise FormatError(f"module {module!r} needs 2-D lora_A [r, in] and lora_B [out, r]", where)
        r = int(_pattern_value(module, cfg.get("rank_pattern"), r_default))
        alpha = float(_pattern_value(module, cfg.get("alpha_pattern"), alpha_default))
        if a.shape[0] != r:
            raise FormatError(f"module {module!r}: lora_A has rank {a.shape[0]}, the config says {r}", where)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        target = match_name(module + ".weight", base, where)
        w = base.view(target)
        dw = b.to(torch.float32) @ a.to(torch.float32)  # [out, in]
        if embedding or cfg.get("fan_in_fan_out"):
            dw = dw.T
        dw = dw * scale
        if tuple(dw.shape) != tuple(w.shape):
            raise SpraError(
                f"module {module!r}: ΔW is {list(dw.shape)} but {target!r} is {list(w.shape)}"
                + ("" if embedding else " (is fan_in_fan_out set right?)"),
                where,
            )
        flat_dw = dw.reshape(-1)
        idx = torch.nonzero(flat_dw).squeeze(1)
        energy = float(flat_dw.double().square().sum())
        if density is not None:
            k = min(seeded_count(w.numel(), density), idx.numel())
            if k < idx.numel():
                idx = torch.topk(flat_dw.abs(), k, sorted=False).indices.sort().values
        kept = float(flat_dw[idx].double().square().sum())
        retained[target] = kept / energy if energy else 1.0
        kept_energy, total_energy = kept_energy + kept, total_energy + energy
        if idx.numel() == 0:
            continue
        values = flat_dw[idx].contiguous()
        gathered = ops.gather(w, idx)
        deltas[target] = TensorDelta(
            target, tuple(w.shape), w.dtype, ExplicitSupport(w.numel(), idx.numpy()), values, fingerprints(gathered)
        )
    if not pairs:
        raise SpraError("holds no LoRA matrices", where)
    provenance = {
        "method": "convert",
        "from": "peft-lora",
        "path": str(lora_dir),
        "r": r_default,
        "lora_alpha": alpha_default,
        "use_rslora": bool(cfg.get("use_rslora")),
        "density": density,
        "retained": retained,
        "retained_total": kept_energy / total_energy if total_energy else 1.0,
    }
    return Adapter(deltas, {}, base.identity(), {}, provenance, exact=False)


# ------------------------------------------------------------------------------------- the command


def detect_source(path: str | os.PathLike) -> str:
    """The layout at `path` by the files present: a file is a .spra adapter, a directory with
    ``adapter_config.json`` a PEFT LoRA adapter, any other directory a peft-sparta one."""
    path = Path(path)
    if path.is_file():
        return "spra"
    return "lora" if (path / "adapter_config.json").is_file() else "peft-sparta"


def recorded_base(path: str | os.PathLike, source: str) -> str:
    """The base a peft-sparta or LoRA directory names in its config (for convert without a base)."""
    path = Path(path)
    config = path / (CONFIG if source == "peft-sparta" else "adapter_config.json")
    key = "sparta_pretrained_model" if source == "peft-sparta" else "base_model_name_or_path"
    try:
        name = json.loads(config.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        name = None
    if not name:
        raise SpraError(f"no base recorded in {config.name}: give --base", path)
    return name


def convert_files(
    src: str | os.PathLike,
    out: str | os.PathLike,
    source: str = "auto",
    target: str | None = None,
    base: str | None = None,
    density: float | None = None,
    overwrite: bool = False,
) -> tuple[Adapter, str, str]:
    """Convert `src` (one of SOURCES, or "auto") into `out` (one of TARGETS; default: a .spra file,
    or peft-sparta from a .spra file). `base`: a checkpoint path or Hub id (default: the one the
    source records); `density`: LoRA only. Returns (the adapter converted, the target, the base)."""
    if source == "auto":
        source = detect_source(src)
    target = target or ("peft-sparta" if source == "spra" else "spra")
    if source == target or (source == "lora" and target != "spra"):
        raise SpraError(f"cannot convert {source} to {target}", src)
    if source == "spra":
        adapter = Adapter.load(src)
        base_name = base or adapter.base.get("name")
        if not base_name:
            raise SpraError("the adapter records no base: give --base", src)
        write_peft_sparta(adapter, out, base_name, None, overwrite, inputs=(src, base_name))
        return adapter, target, base_name
    base_name = base or recorded_base(src, source)
    if source == "lora":
        adapter = lora_to_sparse(src, open_checkpoint(base_name), density)
    else:
        adapter = read_peft_sparta(src, open_checkpoint(base_name))
    adapter.save(out, overwrite, inputs=(src, base_name))
    return adapter, target, base_name
