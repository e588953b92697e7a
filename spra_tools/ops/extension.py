"""The compiled extension: built just in time on first use, against the installed torch, and cached.

Why JIT: an ahead-of-time build inside pip's isolated build environment would pull a multi-GB
CUDA torch, and a build failure would fail the install. Here the install never compiles; the
first use builds `cuda/spra_cpu.cpp` (and, on a CUDA build of torch with CUDA_HOME present,
`cuda/spra_cuda.cu`) with torch.utils.cpp_extension and ninja into TORCH_EXTENSIONS_DIR, and
later runs load the cached library. A failed build prints one warning and the reference backend
serves; with SPRA_TOOLS_BUILD_EXT=1 a failed build is an error instead (CI sets it).
`spra-tools build-ext` builds ahead of use.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from ..errors import SpraError

KINDS = ("cpu", "cuda")
_status: dict[str, str] = {}
# Its import-time note about CUDA_HOME is noise for our users (a build failure still raises).
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _sources_dir() -> Path:
    checkout = Path(__file__).resolve().parents[2] / "cuda"
    if (checkout / "spra_cpu.cpp").is_file():
        return checkout
    return Path(__file__).resolve().parents[1] / "csrc"  # an installed wheel (see pyproject.toml)


def _find_cuda_home() -> None:
    """When CUDA_HOME is unset, point it at a toolkit with headers: the one behind `nvcc`, or
    /usr/local/cuda (torch would take the parent of whatever `nvcc` is on the PATH)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = ([Path(os.path.realpath(nvcc)).parents[1]] if nvcc else []) + [Path("/usr/local/cuda")]
    for home in candidates:
        if (home / "include" / "cuda_runtime.h").exists() and (home / "bin" / "nvcc").exists():
            os.environ["CUDA_HOME"] = str(home)
            return


_find_cuda_home()  # before anything imports torch.utils.cpp_extension, which reads it once


def unavailable(kind: str) -> str | None:
    """Why `kind` cannot be built here at all, or None."""
    if kind == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME

        if torch.version.cuda is None:
            return "torch is a CPU-only build"
        if not CUDA_HOME or not Path(CUDA_HOME, "include", "cuda_runtime.h").exists():
            return f"no CUDA toolkit at CUDA_HOME={CUDA_HOME} (set CUDA_HOME to a directory with bin/nvcc and include/)"
    if not (_sources_dir() / "spra_cpu.cpp").is_file():
        return f"extension sources not found in {_sources_dir()}"
    return None


def _build_args(kind: str) -> dict:
    src = _sources_dir()
    common = ["-O3", "-ffp-contract=off"]
    if kind == "cpu":
        return dict(
            name="spra_tools_cpu",
            sources=[str(src / "spra_cpu.cpp"), str(src / "spra_sparse_mm_cpu.cpp")],
            extra_cflags=[*common, "-fopenmp", "-march=native"],  # built where it runs
            extra_ldflags=["-fopenmp"],
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # nothing to detect: build for Hopper (H100/H200)
    return dict(
        name="spra_tools_cuda",
        sources=[str(src / n) for n in ("spra_cuda.cu", "spra_train_cuda.cu", "spra_sparse_mm_cuda.cu")],
        extra_cflags=common,
        extra_cuda_cflags=["-O3", "--fmad=false", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"],
        with_cuda=True,
    )


def load(kind: str, build: bool = True) -> str:
    """Load (building if needed and `build`) the `kind` library; returns "ok" or the reason not."""
    if kind in _status and (_status[kind] == "ok" or build):
        return _status[kind]
    reason = unavailable(kind)
    if reason is None:
        from torch.utils import cpp_extension

        args = _build_args(kind)
        library = Path(cpp_extension._get_build_directory(args["name"], verbose=False)) / f"{args['name']}.so"
        try:
            if not build:
                if not library.exists():
                    return "not built yet (run `spra-tools build-ext`, or it builds on first use)"
                torch.ops.load_library(str(library))
            else:
                if not library.exists():
                    print(
                        f"spra-tools: building the {kind} extension (once; cached in {library.parent})", file=sys.stderr
                    )
                cpp_extension.load(**args, is_python_module=False, verbose=False)
            reason = "ok"
        except Exception as e:  # a compiler error, a missing ninja, an ABI mismatch...
            reason = f"build failed: {_first_error(str(e)) or e.__class__.__name__}"
    _status[kind] = reason
    if reason != "ok":
        if os.environ.get("SPRA_TOOLS_BUILD_EXT") == "1":
            raise SpraError(f"the {kind} extension is required (SPRA_TOOLS_BUILD_EXT=1) but unavailable: {reason}")
        if reason.startswith("build failed"):
            warnings.warn(
                f"spra-tools: {kind} extension unavailable ({reason}); using the reference backend", stacklevel=2
            )
    return reason


def _first_error(log: str) -> str:
    """The compiler's first `error:` line of a build log (else its last line), shortened."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    line = next((x for x in lines if "error:" in x), lines[-1] if lines else "")
    return line if len(line) <= 300 else line[:297] + "..."
