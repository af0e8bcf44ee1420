"""The decode step's kernels for MLX's CPU backend (the ``mx.fast`` set Metal and CUDA run is in ``decode.py``).

That backend composes RoPE and attention from many small ops. So here RoPE is one fused multiply-add over a
precomputed cos/sin table (bit for bit MLX's own RoPE), and attention puts each KV head's query group into the rows
of one matmul.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn


def swap_halves(x: mx.array) -> mx.array:
    """``[a, b] -> [b, a]`` over the last axis (the "rotate half" of non-interleaved RoPE, before the signs)."""
    half = x.shape[-1] // 2
    return mx.concatenate([x[..., half:], x[..., :half]], axis=-1)


@functools.lru_cache(maxsize=8)
def rope_table(head_dim: int, base: float, rows: int) -> mx.array:
    """cos and sin of every position's angles, computed as MLX's CPU RoPE computes them, as ``[pos, 2, D]`` rows
    ``[cos, cos]`` and ``[-sin, sin]``: ``rope(x) = x * row[0] + swap_halves(x) * row[1]``."""
    half = head_dim // 2
    inv_freqs = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * (math.log(base) / half))
    theta = mx.arange(rows, dtype=mx.float32)[:, None] * inv_freqs[None]
    cos, sin = mx.cos(theta), mx.sin(theta)
    table = mx.stack([mx.concatenate([cos, cos], -1), mx.concatenate([-sin, sin], -1)], axis=1)
    mx.eval(table)
    return table


class CpuKernels:
    """RoPE from a table in one fused kernel (q/k norm weight and, when a power of two, the query scale folded in)
    and attention with each query group as the rows of one matmul."""

    name = "cpu"

    def __init__(self, head_dim: int, base: float):
        self.head_dim, self.base = head_dim, base
        # Folding 1/sqrt(D) into RoPE before the 16-bit rounding changes no bit only when it is a power of two
        # (head_dim 16 or 64); for 32 and 128 the scale is applied in attention.
        self.fold_scale = math.log2(head_dim**-0.5).is_integer()

    def layer_weights(self, attn: nn.Module, qk_norm: mx.array) -> dict[str, mx.array]:
        """Per-layer extras: the norm weight with halves swapped, and the per-head scale."""
        scale = attn.scale if self.fold_scale else 1.0
        return {"qk_norm_swapped": swap_halves(qk_norm),
                "qk_scale": mx.array([scale] * attn.n_heads + [1.0] * attn.n_kv_heads)[:, None, None]}

    def model_weights(self, rows: int) -> dict[str, mx.array]:
        """The RoPE table for ``rows`` positions."""
        return {"rope": rope_table(self.head_dim, self.base, rows)}

    def positions(self, params: dict[str, Any], positions: mx.array) -> Any:
        """cos and sin rows for ``positions[B, L]``, shaped ``[B, 1, L, D]`` to broadcast over heads."""
        rows = params["rope"][positions]
        return rows[:, None, :, 0], rows[:, None, :, 1]

    def rope(self, qk: mx.array, lp: dict[str, mx.array], pos: mx.array, table: Any) -> mx.array:
        """Normalized ``qk[B, heads, L, D]`` (float32) times its norm weight, rotated."""
        cos, sin = table
        return (qk * lp["qk_norm"] * cos + swap_halves(qk) * lp["qk_norm_swapped"] * sin) * lp["qk_scale"]

    def attend(self, q: mx.array, keys: mx.array, values: mx.array, mask: mx.array | str | None) -> mx.array:
        """Attention as MLX's CPU attention computes it, with each KV head's query group as the rows of one
        matmul instead of a broadcast batch of single rows. ``q`` is ``[B, heads, L, D]``, ``mask`` ``[B, L, W]``,
        or ``None`` / ``"causal"`` when ``keys`` are exactly the positions written (the exact path)."""
        B, nq, L, D = q.shape
        nkv, W = keys.shape[1], keys.shape[2]
        q = q.reshape(B, nkv, -1, D)
        if not self.fold_scale:
            q = q * D**-0.5
        scores = (q @ keys.swapaxes(-1, -2)).reshape(B, nkv, -1, L, W)
        if isinstance(mask, str):  # causal over exact keys: query i sees the keys up to position W - L + i
            mask = (mx.arange(W)[None] <= mx.arange(L)[:, None] + (W - L))[None]
        if mask is not None:
            scores = mx.where(mask[:, None, None], scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        probs = mx.softmax(scores, axis=-1, precise=True).reshape(B, nkv, -1, W)
        return (probs @ values).reshape(B, nq, L, D)
