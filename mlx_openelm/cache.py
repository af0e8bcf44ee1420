"""KV caches: mlx-lm's cache classes (growing, rotating, quantized), one per layer with that layer's width."""

from __future__ import annotations

from typing import Any

from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache


def make_cache(model: Any, max_kv_size: int | None = None, kv_bits: int | None = None,
               kv_group_size: int | None = None):
    """One cache per layer for ``model(tokens, cache=cache)``.

    Each layer's cache takes its width from the first keys it sees, so OpenELM's per-layer KV head counts
    need no configuration. ``max_kv_size`` keeps a sliding window (a rotating cache that holds the first 4
    tokens); ``kv_bits`` (4 or 8) stores keys and values quantized in groups of ``kv_group_size`` (default:
    64, or the head size when smaller).
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
