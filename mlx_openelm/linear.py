"""The decode step's linear layers, dense or quantized, on every backend; on the CPU split across lanes.

MLX's CPU backend runs each stream's ops on one thread, so each matmul but the smallest is split by output rows
across one stream per core ("lanes") and the parts concatenated. On a GPU there is one lane by default: the whole
matmul (``backend.lanes`` decides; an explicit lane count splits on any backend, on streams of the default device).
"""

from __future__ import annotations

import threading

import mlx.core as mx
import mlx.nn as nn

from . import backend

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)
# A matmul is split across lanes only when it is big enough to outweigh the cross-stream synchronisation. MLX's
# bundled CPU BLAS is compute-bound even at one token, so splitting pays well below a million weights: on the 5.8M
# stand-in target (weights of 32K-1M) a 64K floor made the 1-token step and the 5-token verify pass faster.
MIN_SPLIT = 1 << 16  # weights (rows x input features)
Quant = tuple  # (group_size, bits, mode), or () for a dense weight


def cpu_lanes() -> int:
    """How many streams the matmuls are split across by default: the usable cores (at most 8) on the CPU, 1 on a
    GPU (:func:`mlx_openelm.backend.lanes`)."""
    return backend.lanes()


_LANES = threading.local()


def lane_streams(n: int) -> tuple[mx.Stream | None, ...]:
    """``n`` lanes: lane 0 (None) runs on the caller's stream, the others on streams of their own on the default
    device, made on first use in each thread (an MLX stream may only be used on the thread that made it; none is
    made at import)."""
    device = mx.default_device()
    cache, key = _LANES.__dict__, (n, str(device))  # default_device() returns a new object each call
    if key not in cache:
        cache[key] = (None, *(mx.new_stream(device) for _ in range(n - 1)))
    return cache[key]


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
