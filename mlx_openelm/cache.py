"""KV caches: mlx-lm's cache classes (growing, rotating, quantized), one per layer with that layer's width."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache


def make_cache(model: Any, max_kv_size: int | None = None, kv_bits: int | None = None,
               kv_group_size: int | None = None):
    """One cache per layer for ``model(tokens, cache=cache)``.

    Each layer's cache takes its width from the first keys it sees, so OpenELM's per-layer KV head counts
    need no configuration. The default ``KVCache`` is a preallocated buffer grown in steps of 256 tokens, which
    the compiled decode step (``mlx_openelm.decode``) writes in place. ``max_kv_size`` keeps a sliding window
    (a rotating cache that holds the first 4 tokens); ``kv_bits`` (4 or 8) stores keys and values quantized
    in groups of ``kv_group_size`` (default: 64, or the head size when smaller).
    """
    if kv_bits is not None and kv_bits not in (4, 8):
        raise ValueError(f"kv_bits must be 4 or 8, got {kv_bits}")
    if max_kv_size is not None and max_kv_size < 8:
        raise ValueError(f"max_kv_size must be at least 8 tokens, got {max_kv_size}")
    if max_kv_size is not None and kv_bits is not None:
        raise ValueError("a rotating cache (max_kv_size) cannot also be quantized (kv_bits): choose one")
    if kv_bits is not None:
        head_dim = model.args.head_dim
        kv_group_size = kv_group_size or min(64, head_dim)
        if kv_group_size not in (32, 64, 128) or head_dim % kv_group_size:
            raise ValueError(f"kv_group_size {kv_group_size} must be 32, 64 or 128 and divide the head size {head_dim}")
    n = len(model.layers)
    if max_kv_size is not None:
        return [RotatingKVCache(max_size=max_kv_size, keep=4) for _ in range(n)]
    if kv_bits is not None:
        return [QuantizedKVCache(group_size=kv_group_size, bits=kv_bits) for _ in range(n)]
    return [KVCache() for _ in range(n)]


def is_fixed_capacity(cache: list) -> bool:
    """Whether every layer's cache is a plain ``KVCache`` (a buffer a compiled step can write in place)."""
    return bool(cache) and all(type(c) is KVCache for c in cache)


def reserve(cache: list[KVCache], tokens: int, args: Any, batch: int, dtype: mx.Dtype) -> None:
    """Grow each layer's buffer to hold ``tokens`` positions, rounded up to the cache's step (256).

    Empty caches are allocated as ``[batch, kv_heads, capacity, head_dim]`` with this layer's KV heads (from
    ``args``) in ``dtype``.
    """
    for c, kv_heads in zip(cache, args.num_kv_heads):
        capacity = -(-tokens // c.step) * c.step
        if c.keys is not None and c.keys.shape[2] >= capacity:
            continue
        have = 0 if c.keys is None else c.keys.shape[2]
        shape = (batch, kv_heads, capacity - have, args.head_dim)
        if c.keys is None:
            c.keys, c.values = mx.zeros(shape, dtype), mx.zeros(shape, dtype)
        else:
            c.keys = mx.concatenate([c.keys, mx.zeros(shape, c.keys.dtype)], axis=2)
            c.values = mx.concatenate([c.values, mx.zeros(shape, c.values.dtype)], axis=2)
