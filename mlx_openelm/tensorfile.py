"""safetensors headers, read and checked against the file size without touching the tensor data.

The converter reads source checkpoints with it, the loader checks converted folders with it: a truncated or
corrupt file is named before anything is loaded, instead of failing later at evaluation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

# Byte sizes of the safetensors dtypes OpenELM files hold: float weights, and packed quantized ones (U32).
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}
FLOAT_DTYPES = ("F32", "F16", "BF16")
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as its file header describes it."""

    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of this tensor's data in the file."""
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


def _corrupt(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is not a valid safetensors file ({why}): it is truncated or corrupt; download or "
                      "convert it again")


def read_safetensors_header(path: Path, dtypes: tuple[str, ...] = tuple(DTYPE_BYTES)) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file; a truncated or corrupt header or data section is an error, and so is a
    tensor whose dtype is not one of ``dtypes``."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _corrupt(path, f"{size} bytes, shorter than a header")
        n = int.from_bytes(raw, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise _corrupt(path, f"header length {n} does not fit in {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _corrupt(path, f"unreadable header: {e}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"bad header entry for {name}") from None
        if dtype not in dtypes:
            raise ValueError(f"{path}: tensor {name} has dtype {dtype}; expected one of {', '.join(dtypes)}")
        if end - start != math.prod(shape) * DTYPE_BYTES[dtype] or not 0 <= start <= end <= data_size:
            raise _corrupt(path, f"tensor {name} lies outside the file's {data_size} data bytes")
        tensors[name] = TensorInfo(path, dtype, shape)
    return tensors
