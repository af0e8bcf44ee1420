"""The floating-point types a model is stored or computed in, by name."""

from __future__ import annotations

import mlx.core as mx

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def parse_dtype(name: str | mx.Dtype) -> mx.Dtype:
    """``"bfloat16"`` -> ``mx.bfloat16``; an ``mx.Dtype`` passes through."""
    if isinstance(name, mx.Dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: mx.Dtype) -> str:
    """``mx.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("mlx.core.")
