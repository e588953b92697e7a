"""Tensor dtypes on the torch side: the torch dtype of every safetensors dtype name, and a tensor's bits.

The names, and the bytes each element takes on disk, are `format.DTYPES` (numpy; format.py never
imports torch). `TORCH_DTYPES` adds the torch dtype of each name and is checked against that table
when this module is imported, so the two cannot drift apart. Which of the names an adapter may
hold is `format.FLOAT_DTYPES`; how users spell them (`--values-dtype bf16`) is `format.SHORT_DTYPES`.
"""

from __future__ import annotations

import numpy as np
import torch

from . import format as fmt
from .errors import SpraError

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16,
    "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
}  # fmt: skip
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}

_disagree = sorted(
    name
    for name in TORCH_DTYPES.keys() | fmt.DTYPES.keys()
    if name not in TORCH_DTYPES or name not in fmt.DTYPES or TORCH_DTYPES[name].itemsize != fmt.DTYPES[name][0]
)
if _disagree:
    raise ImportError(f"format.DTYPES and dtypes.TORCH_DTYPES disagree on {', '.join(_disagree)}")

# Integers of each element size: signed in torch (its comparison ops support them everywhere),
# unsigned in numpy (a fingerprint zero-extends the bits).
_TORCH_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NUMPY_INTS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
_NUMPY_UINTS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a float dtype an adapter may hold (one of format.FLOAT_DTYPES); SpraError for others."""
    name = DTYPE_NAMES.get(dtype)
    if name not in fmt.FLOAT_DTYPES:
        raise SpraError(f"unsupported weight dtype {dtype} (need float32, bfloat16 or float16)")
    return name


def bit_view(t: torch.Tensor) -> torch.Tensor:
    """`t`'s elements reinterpreted as integers of the same width (same memory, no gradient):
    equal bit views mean equal bits, where float equality would merge -0.0 with 0.0 and split NaNs."""
    return t.detach().view(_TORCH_INTS[t.element_size()])


def raw_bits(t: torch.Tensor) -> np.ndarray:
    """`t`'s raw bits as an unsigned numpy array on the CPU (bf16/fp16 -> uint16, fp32 -> uint32):
    what a container stores and a fingerprint hashes."""
    return bit_view(t.contiguous()).cpu().numpy().view(_NUMPY_UINTS[t.element_size()])


def from_raw(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A tensor of dtype name `dtype` over a container's raw elements (bf16 arrives as uint16), same shape."""
    torch_dtype = TORCH_DTYPES[dtype]
    ints = np.ascontiguousarray(array).view(_NUMPY_INTS[torch_dtype.itemsize])
    return torch.from_numpy(ints).view(torch_dtype)
