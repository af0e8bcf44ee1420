"""A compiled single-token decode step over fixed-capacity KV caches, its matmuls split across CPU cores.

mlx-lm runs each decode step op by op from Python; for OpenELM's small models that host overhead is a large
part of a step. Here one ``mx.compile`` trace serves every step: the position is an ``mx.array`` (an integer
would be baked into the trace), the caches are preallocated ``[B, kv_heads, capacity, head_dim]`` buffers
written in place with ``slice_update`` and read through a mask, so the shapes change only when the capacity
grows (in steps of 256 tokens, or sized up front from the prompt and the token budget).

MLX's CPU backend runs each op on one thread per stream, so on the CPU the step's matmuls are split by output
rows across one stream per core ("lanes"). The step takes the weights as inputs (no constants baked into the
trace), so one trace serves every model of the same structure. The numerics follow ``model.py`` op for op.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .cache import reserve

_QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)
Quant = tuple  # (group_size, bits, mode), or () for a dense weight


def cpu_lanes() -> int:
    """How many streams the decode step's matmuls are split across: the usable cores on the CPU backend
    (at most 8), 1 on a GPU."""
    if mx.default_device().type != mx.cpu:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


@functools.cache
def _lane_streams(n: int) -> tuple[mx.Stream | None, ...]:
    # Lane 0 runs on the caller's stream; the others get their own CPU streams (threads).
    return (None, *(mx.new_stream(mx.cpu) for _ in range(n - 1)))


@dataclass(frozen=True)
class Plan:
    """The static structure a trace depends on (hashable; the weights themselves are inputs)."""

    heads: tuple[tuple[int, int], ...]  # (query heads, kv heads) per layer
    quant: tuple[tuple[Quant, Quant, Quant, Quant], ...]  # qkv_proj, out_proj, proj_1, proj_2 per layer
    embed_quant: Quant
    head_dim: int
    eps: float
    rope_base: float
    lanes: int


def _quant(m: nn.Module) -> Quant:
    return (m.group_size, m.bits, m.mode) if isinstance(m, _QUANTIZED) else ()


def _arrays(m: nn.Module) -> list[mx.array]:
    names = ("weight", "scales", "biases") if isinstance(m, _QUANTIZED) else ("weight",)
    return [m[n] for n in names if m.get(n) is not None]


def _lanes(m: nn.Module, n: int) -> list[list[mx.array]]:
    arrays = _arrays(m)
    rows = arrays[0].shape[0]
    cut = [rows * i // n for i in range(n + 1)]
    return [[a[cut[i] : cut[i + 1]] for a in arrays] for i in range(n)]


def plan_and_params(model: nn.Module, lanes: int) -> tuple[Plan, dict[str, Any]]:
    """The decode step's static plan and its weight inputs (row slices are views: no copies)."""
    a, t = model.args, model.transformer
    linears = [(b.attn.qkv_proj, b.attn.out_proj, b.ffn.proj_1, b.ffn.proj_2) for b in t.layers]
    plan = Plan(
        heads=tuple(zip(a.num_query_heads, a.num_kv_heads)),
        quant=tuple(tuple(_quant(m) for m in ms) for ms in linears),
        embed_quant=_quant(t.token_embeddings),
        head_dim=a.head_dim,
        eps=a.rms_norm_eps,
        rope_base=a.rope_freq_constant,
        lanes=lanes,
    )
    layers = [
        {"attn_norm": b.attn_norm.weight, "q_norm": b.attn.q_norm.weight, "k_norm": b.attn.k_norm.weight,
         "ffn_norm": b.ffn_norm.weight, "linears": [_lanes(m, lanes) for m in ms]}
        for b, ms in zip(t.layers, linears)
    ]
    params = {"embed": _arrays(t.token_embeddings), "head": _lanes(t.token_embeddings, lanes),
              "norm": t.norm.weight, "layers": layers}
    mx.eval(params)
    return plan, params


def _matmul(x: mx.array, w: list[mx.array], quant: Quant) -> mx.array:
    if not quant:
        return x @ w[0].T
    group_size, bits, mode = quant
    biases = w[2] if len(w) > 2 else None
    return mx.quantized_matmul(x, w[0], w[1], biases, transpose=True, group_size=group_size, bits=bits, mode=mode)


def _linear(x: mx.array, lanes: list[list[mx.array]], quant: Quant, streams: tuple) -> mx.array:
    if len(lanes) == 1:
        return _matmul(x, lanes[0], quant)
    outs = []
    for stream, w in zip(streams, lanes):
        if stream is None:
            outs.append(_matmul(x, w, quant))
        else:
            with mx.stream(stream):
                outs.append(_matmul(x, w, quant))
    return mx.concatenate(outs, axis=-1)


def _embed(tokens: mx.array, w: list[mx.array], quant: Quant) -> mx.array:
    if not quant:
        return w[0][tokens]
    group_size, bits, mode = quant
    biases = w[2][tokens] if len(w) > 2 else None
    return mx.dequantize(w[0][tokens], w[1][tokens], biases, group_size=group_size, bits=bits, mode=mode)


class _Traced:
    """One compiled step function per plan, shared by every model of that structure; counts its traces."""

    def __init__(self, plan: Plan):
        self.plan, self.traces = plan, 0
        self.streams = _lane_streams(plan.lanes)
        self.fn = mx.compile(self._trace)

    def _trace(self, *args: Any) -> tuple:
        self.traces += 1  # Python runs only while mx.compile traces: this counts (re)compilations
        return self.forward(*args)

    def forward(self, tokens: mx.array, pos: mx.array, keys: list, values: list, params: dict) -> tuple:
        """Logits ``[B, vocab]`` for ``tokens[B, 1]`` at position ``pos``, and the updated cache buffers."""
        p, s = self.plan, self.streams
        B, D = tokens.shape[0], p.head_dim
        h = _embed(tokens, params["embed"], p.embed_quant)
        mask = mx.arange(keys[0].shape[2]) <= pos
        new_keys, new_values = [], []
        for lp, quant, (nq, nkv), k_cache, v_cache in zip(params["layers"], p.quant, p.heads, keys, values):
            qkv_w, out_w, up_w, down_w = lp["linears"]
            x = mx.fast.rms_norm(h, lp["attn_norm"], p.eps)
            # One token: [B, 1, heads * D] -> [B, heads, 1, D] is a reshape, no transpose.
            q, k, v = mx.split(_linear(x, qkv_w, quant[0], s).reshape(B, -1, 1, D), [nq, nq + nkv], axis=1)
            q = mx.fast.rms_norm(q.astype(mx.float32), lp["q_norm"], p.eps)
            k = mx.fast.rms_norm(k.astype(mx.float32), lp["k_norm"], p.eps)
            q = mx.fast.rope(q, D, traditional=False, base=p.rope_base, scale=1.0, offset=pos).astype(v.dtype)
            k = mx.fast.rope(k, D, traditional=False, base=p.rope_base, scale=1.0, offset=pos).astype(v.dtype)
            k_cache = mx.slice_update(k_cache, k, pos, axes=(2,))
            v_cache = mx.slice_update(v_cache, v, pos, axes=(2,))
            new_keys.append(k_cache)
            new_values.append(v_cache)
            out = mx.fast.scaled_dot_product_attention(q, k_cache, v_cache, scale=D**-0.5, mask=mask)
            h = h + _linear(out.reshape(B, 1, -1), out_w, quant[1], s)
            gate, up = mx.split(_linear(mx.fast.rms_norm(h, lp["ffn_norm"], p.eps), up_w, quant[2], s), 2, axis=-1)
            h = h + _linear(nn.silu(gate) * up, down_w, quant[3], s)
        logits = _linear(mx.fast.rms_norm(h, params["norm"], p.eps), params["head"], p.embed_quant, s)
        return logits[:, 0, :], new_keys, new_values


@functools.cache
def _traced(plan: Plan) -> _Traced:
    return _Traced(plan)


class DecodeStep:
    """``step(tokens[B, 1]) -> logits[B, vocab]``: one decode step of ``model`` over ``cache`` (plain
    ``KVCache``s, from ``make_cache``), which it grows when full and advances by one token.

    ``compile=False`` runs the same step op by op; ``lanes`` defaults to :func:`cpu_lanes`. If compiling
    fails (a backend without support), the step warns once and falls back to the model's own forward pass.
    """

    def __init__(self, model: nn.Module, cache: list, compile: bool = True, lanes: int | None = None):
        self.model, self.cache = model, cache
        plan, self.params = plan_and_params(model, lanes or cpu_lanes())
        self.traced = _traced(plan)
        self.compiled = compile
        self.fallback = False
        emb = model.transformer.token_embeddings
        self.dtype = (emb.scales if isinstance(emb, _QUANTIZED) else emb.weight).dtype

    @property
    def traces(self) -> int:
        """How many times this structure's step has been traced (compiled) in this process."""
        return self.traced.traces

    def reserve(self, tokens: int, batch: int = 1) -> None:
        """Size the caches for ``tokens`` positions up front, so the step does not grow them (or retrace)."""
        reserve(self.cache, tokens, self.model.args, batch, self.dtype)

    def __call__(self, tokens: mx.array) -> mx.array:
        if self.fallback:
            return self.model(tokens, cache=self.cache)[:, -1, :]
        cache = self.cache
        if tokens.dtype != mx.uint32:  # the prompt's dtype and the sampler's may differ: one trace for both
            tokens = tokens.astype(mx.uint32)
        self.reserve(cache[0].offset + 1, tokens.shape[0])
        args = (tokens, mx.array(cache[0].offset, dtype=mx.int32), [c.keys for c in cache],
                [c.values for c in cache], self.params)
        if not self.compiled:
            logits, keys, values = self.traced.forward(*args)
        else:
            try:
                logits, keys, values = self.traced.fn(*args)
            except Exception as e:  # whatever a backend cannot compile, the model's own path computes the same
                warnings.warn(f"compiled decode step unavailable ({e}); using the uncompiled path", stacklevel=2)
                self.fallback = True
                return self(tokens)
        for c, k, v in zip(cache, keys, values):
            c.keys, c.values = k, v
            c.offset += 1
        return logits
