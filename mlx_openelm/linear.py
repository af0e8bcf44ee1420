"""The decode step's kernels for MLX's CPU backend, and the lanes its matmuls are split across.

That backend composes RoPE and attention from many small ops and runs each stream's ops on one thread. So here
RoPE is one fused multiply-add over a precomputed cos/sin table (bit for bit MLX's own RoPE), attention puts each
KV head's query group into the rows of one matmul, and each matmul but the smallest is split by output rows
across one stream per core ("lanes"). The ``mx.fast`` kernels Metal and CUDA run are in ``decode.py`` beside these.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from typing import Any

import mlx.core as mx
import mlx.nn as nn

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)
# A matmul is split across lanes only when it is big enough to outweigh the cross-stream synchronisation. MLX's
# bundled CPU BLAS is compute-bound even at one token, so splitting pays well below a million weights: on the 5.8M
# stand-in target (weights of 32K-1M) a 64K floor made the 1-token step and the 5-token verify pass faster.
MIN_SPLIT = 1 << 16  # weights (rows x input features)
Quant = tuple  # (group_size, bits, mode), or () for a dense weight


def cpu_lanes() -> int:
    """How many streams the matmuls are split across: the usable cores (at most 8) when the default device is
    the CPU, else 1 (lanes are CPU streams: on a GPU they would move the work to the CPU)."""
    if mx.default_device().type != mx.cpu:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


_LANES = threading.local()


def lane_streams(n: int) -> tuple[mx.Stream | None, ...]:
    """``n`` lanes: lane 0 (None) runs on the caller's stream, the others on CPU streams of their own, made on first
    use in each thread (an MLX stream may only be used on the thread that made it; none is made at import)."""
    cache = _LANES.__dict__
    if n not in cache:
        cache[n] = (None, *(mx.new_stream(mx.cpu) for _ in range(n - 1)))
    return cache[n]


def row_cuts(rows: int, n: int) -> list[int]:
    """Boundaries that split ``rows`` into ``n`` nearly equal contiguous parts (any ``n`` from 1 to ``rows``)."""
    return [rows * i // n for i in range(n + 1)]


def quant_of(m: nn.Module) -> Quant:
    """A layer's quantization as the trace keys it: ``(group_size, bits, mode)``, or ``()`` when dense."""
    return (m.group_size, m.bits, m.mode) if isinstance(m, QUANTIZED) else ()


def arrays_of(m: nn.Module) -> list[mx.array]:
    """A layer's weight arrays: ``[weight]``, or ``[weight, scales, biases]`` when quantized."""
    names = ("weight", "scales", "biases") if isinstance(m, QUANTIZED) else ("weight",)
    return [m[n] for n in names if m.get(n) is not None]


def split_rows(m: nn.Module, lanes: int) -> list[list[mx.array]]:
    """``m``'s arrays cut by output rows into ``lanes`` parts (views, no copies); one part when ``m`` is small."""
    arrays = arrays_of(m)
    rows, cols = arrays[0].shape
    if rows * (cols * 32 // m.bits if isinstance(m, QUANTIZED) else cols) < MIN_SPLIT:
        lanes = 1
    cut = row_cuts(rows, min(lanes, rows))
    return [[a[cut[i] : cut[i + 1]] for a in arrays] for i in range(len(cut) - 1)]


def matmul(x: mx.array, w: list[mx.array], quant: Quant) -> mx.array:
    """``x @ W.T`` for a dense or quantized weight."""
    if not quant:
        return x @ w[0].T
    group_size, bits, mode = quant
    biases = w[2] if len(w) > 2 else None
    return mx.quantized_matmul(x, w[0], w[1], biases, transpose=True, group_size=group_size, bits=bits, mode=mode)


def linear(x: mx.array, parts: list[list[mx.array]], quant: Quant, streams: tuple) -> mx.array:
    """``x @ W.T`` with each row part of ``W`` on its own lane, concatenated."""
    if len(parts) == 1:
        return matmul(x, parts[0], quant)
    outs = []
    for stream, w in zip(streams, parts):
        if stream is None:
            outs.append(matmul(x, w, quant))
        else:
            with mx.stream(stream):
                outs.append(matmul(x, w, quant))
    return mx.concatenate(outs, axis=-1)


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

    def attend(self, q: mx.array, keys: mx.array, values: mx.array, mask: mx.array) -> mx.array:
        """Attention as MLX's CPU attention computes it, with each KV head's query group as the rows of one
        matmul instead of a broadcast batch of single rows. ``q`` is ``[B, heads, L, D]``, ``mask`` ``[B, L, W]``."""
        B, nq, L, D = q.shape
        nkv, W = keys.shape[1], keys.shape[2]
        q = q.reshape(B, nkv, -1, D)
        if not self.fold_scale:
            q = q * D**-0.5
        scores = (q @ keys.swapaxes(-1, -2)).reshape(B, nkv, -1, L, W)
        scores = mx.where(mask[:, None, None], scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        probs = mx.softmax(scores, axis=-1, precise=True).reshape(B, nkv, -1, W)
        return (probs @ values).reshape(B, nq, L, D)
