"""A compiled decode step over fixed-capacity KV caches, with its matmuls split across CPU cores.

mlx-lm runs each decode step op by op from Python; for OpenELM's small models that overhead is a large part of
a step. Here one ``mx.compile`` trace serves many steps: the position is an ``mx.array`` (an integer would be
baked into the trace), the caches are preallocated ``[B, kv_heads, capacity, head_dim]`` buffers written in
place with ``slice_update`` (sized up front from the prompt and the token budget, else grown in steps of 256),
and attention reads a masked prefix whose length grows in coarse steps (:func:`attention_window`), so a new
trace is needed only every 64 or 256 tokens. The weights are inputs, not constants baked into the trace, so
one trace serves every model of the same structure. The numerics follow ``model.py``.

On MLX's CPU backend each stream runs its ops on one thread, so the big matmuls are split by output rows across
one stream per core ("lanes"), for the prompt too; and RoPE and attention, which that backend composes from many
small ops, are computed with fewer, hand-fused ones (bit for bit the same RoPE).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .cache import reserve

_QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)
# A matmul is split across lanes only when it is big enough to outweigh the cross-stream synchronisation.
MIN_SPLIT = 1 << 20  # weights (rows x input features)
Quant = tuple  # (group_size, bits, mode), or () for a dense weight


def cpu_lanes() -> int:
    """How many streams the decode step's big matmuls are split across: the usable cores on the CPU backend
    (at most 8), 1 on a GPU."""
    if mx.default_device().type != mx.cpu:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


def attention_window(positions: int, capacity: int) -> int:
    """The cache prefix a step attends to (a static shape, so one trace per window): ``positions`` rounded up
    to a multiple of 64 up to 512, of 256 beyond, at most ``capacity``. MLX's CPU attention costs time in
    proportion to the keys it reads, so attending to the whole capacity would waste it."""
    step = 64 if positions <= 512 else 256
    return min(capacity, -(-positions // step) * step)


@functools.cache
def lane_streams(n: int) -> tuple[mx.Stream | None, ...]:
    """``n`` lanes: lane 0 (None) runs on the caller's stream, the others on CPU streams (threads) of their own."""
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
    cpu: bool  # MLX's CPU backend composes RoPE and attention from small ops: fewer, hand-fused ones here
    fold_scale: bool  # the query scale is a power of two: folded into the RoPE kernel without changing a bit


def _quant(m: nn.Module) -> Quant:
    return (m.group_size, m.bits, m.mode) if isinstance(m, _QUANTIZED) else ()


def _arrays(m: nn.Module) -> list[mx.array]:
    names = ("weight", "scales", "biases") if isinstance(m, _QUANTIZED) else ("weight",)
    return [m[n] for n in names if m.get(n) is not None]


def _lanes(m: nn.Module, n: int) -> list[list[mx.array]]:
    arrays = _arrays(m)
    rows, cols = arrays[0].shape
    if rows * (cols * 32 // m.bits if isinstance(m, _QUANTIZED) else cols) < MIN_SPLIT:
        n = 1
    cut = [rows * i // n for i in range(n + 1)]
    return [[a[cut[i] : cut[i + 1]] for a in arrays] for i in range(n)]


def _swap_halves(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([x[..., half:], x[..., :half]], axis=-1)


def _qk_norm_weights(attn: nn.Module, cpu: bool, fold_scale: bool) -> dict[str, mx.array]:
    # q_norm's weight for every query head, then k_norm's for every KV head: one norm for both (float32, as the
    # model computes them). On the CPU also the weight with halves swapped, and the query scale when a power of
    # two (then folding it in before the 16-bit rounding changes no bit), for the fused RoPE below.
    q = mx.broadcast_to(attn.q_norm.weight, (attn.n_heads, 1, attn.head_dim))
    k = mx.broadcast_to(attn.k_norm.weight, (attn.n_kv_heads, 1, attn.head_dim))
    w = {"qk_norm": mx.concatenate([q, k]).astype(mx.float32)}
    if cpu:
        w["qk_norm_swapped"] = _swap_halves(w["qk_norm"])
        scale = attn.scale if fold_scale else 1.0
        w["qk_scale"] = mx.array([scale] * attn.n_heads + [1.0] * attn.n_kv_heads)[:, None, None]
    return w


@functools.lru_cache(maxsize=8)
def _rope_table(head_dim: int, base: float, rows: int) -> mx.array:
    # cos and sin of every position's angles, computed exactly as MLX's CPU RoPE computes them, as [pos, 2, D]
    # rows: [cos, cos] and [-sin, sin], so that rope(x) = x * row[0] + swap_halves(x) * row[1].
    half = head_dim // 2
    inv_freqs = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * (math.log(base) / half))
    theta = mx.arange(rows, dtype=mx.float32)[:, None] * inv_freqs[None]
    cos, sin = mx.cos(theta), mx.sin(theta)
    table = mx.stack([mx.concatenate([cos, cos], -1), mx.concatenate([-sin, sin], -1)], axis=1)
    mx.eval(table)
    return table


def plan_and_params(model: nn.Module, lanes: int) -> tuple[Plan, dict[str, Any]]:
    """The decode step's static plan and its weight inputs (row slices are views: no copies)."""
    a, t = model.args, model.transformer
    cpu = mx.default_device().type == mx.cpu
    fold_scale = math.log2(a.head_dim**-0.5).is_integer()
    linears = [(b.attn.qkv_proj, b.attn.out_proj, b.ffn.proj_1, b.ffn.proj_2) for b in t.layers]
    plan = Plan(
        heads=tuple(zip(a.num_query_heads, a.num_kv_heads)),
        quant=tuple(tuple(_quant(m) for m in ms) for ms in linears),
        embed_quant=_quant(t.token_embeddings),
        head_dim=a.head_dim,
        eps=a.rms_norm_eps,
        rope_base=a.rope_freq_constant,
        lanes=lanes,
        cpu=cpu,
        fold_scale=fold_scale,
    )
    layers = [
        {"attn_norm": b.attn_norm.weight, "ffn_norm": b.ffn_norm.weight, "linears": [_lanes(m, lanes) for m in ms],
         **_qk_norm_weights(b.attn, cpu, fold_scale)}
        for b, ms in zip(t.layers, linears)
    ]
    params = {"embed": _arrays(t.token_embeddings), "head": _lanes(t.token_embeddings, lanes),
              "norm": t.norm.weight, "layers": layers}
    if cpu:
        rows = max(a.max_context_length, a.rope_max_length)
        params["rope"] = _rope_table(a.head_dim, a.rope_freq_constant, rows)
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


def _attend(q: mx.array, keys: mx.array, values: mx.array, mask: mx.array, scale: float) -> mx.array:
    """Attention as MLX's CPU attention computes it, with each KV head's query group as the rows of one matmul
    instead of a broadcast batch of single rows. ``q`` is ``[B, heads, L, D]``, ``mask`` ``[L, keys]``."""
    B, nq, L, D = q.shape
    nkv, W = keys.shape[1], keys.shape[2]
    q = q.reshape(B, nkv, -1, D)
    if scale != 1.0:
        q = q * scale
    scores = (q @ keys.swapaxes(-1, -2)).reshape(B, nkv, -1, L, W)
    scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
    probs = mx.softmax(scores, axis=-1, precise=True).reshape(B, nkv, -1, W)
    return (probs @ values).reshape(B, nq, L, D)


class _Traced:
    """One compiled step function per plan, shared by every model of that structure; counts its traces."""

    def __init__(self, plan: Plan):
        self.plan, self.traces = plan, 0
        self.streams = lane_streams(plan.lanes)
        self.fn = mx.compile(self._trace)

    def _trace(self, *args: Any) -> tuple:
        self.traces += 1  # Python runs only while mx.compile traces: this counts (re)compilations
        return self.forward(*args)

    def forward(self, tokens: mx.array, pos: mx.array, window: int, keys: list, values: list, params: dict) -> tuple:
        """Logits ``[B, vocab]`` of the last of ``tokens[B, L]``, placed from position ``pos`` (attending to the
        first ``window`` cache positions), and the updated cache buffers."""
        p, s = self.plan, self.streams
        (B, L), D = tokens.shape, p.head_dim
        h = _embed(tokens, params["embed"], p.embed_quant)
        dtype, h = h.dtype, h.astype(mx.float32)  # a float32 residual stream, as in the model
        positions = pos + mx.arange(L)
        mask = mx.arange(window)[None] <= positions[:, None]
        if p.cpu:
            rope = params["rope"][positions]
            cos, sin = rope[:, 0], rope[:, 1]
        new_keys, new_values = [], []
        for lp, quant, (nq, nkv), k_cache, v_cache in zip(params["layers"], p.quant, p.heads, keys, values):
            qkv_w, out_w, up_w, down_w = lp["linears"]
            x = mx.fast.rms_norm(h, lp["attn_norm"], p.eps).astype(dtype)
            qkv = _linear(x, qkv_w, quant[0], s)
            # One token: [B, 1, heads * D] -> [B, heads, 1, D] is a reshape, no transpose.
            qkv = qkv.reshape(B, -1, 1, D) if L == 1 else qkv.reshape(B, L, -1, D).transpose(0, 2, 1, 3)
            qk, v = mx.split(qkv, [nq + nkv], axis=1)
            # q and k together: one norm, one RoPE, in float32 like the model, rounded once.
            qk = mx.fast.rms_norm(qk.astype(mx.float32), None, p.eps)
            if p.cpu:  # RoPE from the table in one fused kernel, norm weight and query scale folded in
                swapped = _swap_halves(qk) * lp["qk_norm_swapped"]
                qk = (qk * lp["qk_norm"] * cos + swapped * sin) * lp["qk_scale"]
            else:
                qk = mx.fast.rope(qk * lp["qk_norm"], D, traditional=False, base=p.rope_base, scale=1.0, offset=pos)
            q, k = mx.split(qk.astype(v.dtype), [nq], axis=1)
            k_cache = mx.slice_update(k_cache, k, pos, axes=(2,))
            v_cache = mx.slice_update(v_cache, v, pos, axes=(2,))
            new_keys.append(k_cache)
            new_values.append(v_cache)
            k_cache, v_cache = k_cache[:, :, :window], v_cache[:, :, :window]
            if p.cpu:
                out = _attend(q, k_cache, v_cache, mask, scale=1.0 if p.fold_scale else D**-0.5)
            else:
                out = mx.fast.scaled_dot_product_attention(q, k_cache, v_cache, scale=D**-0.5, mask=mask)
            out = out.reshape(B, 1, -1) if L == 1 else out.transpose(0, 2, 1, 3).reshape(B, L, -1)
            h = h + _linear(out, out_w, quant[1], s)
            x = mx.fast.rms_norm(h, lp["ffn_norm"], p.eps).astype(dtype)
            gate, up = mx.split(_linear(x, up_w, quant[2], s), 2, axis=-1)
            h = h + _linear(nn.silu(gate) * up, down_w, quant[3], s)
        x = mx.fast.rms_norm(h[:, -1:], params["norm"], p.eps).astype(dtype)
        logits = _linear(x, params["head"], p.embed_quant, s)
        return logits[:, 0, :], new_keys, new_values


@functools.cache
def _traced(plan: Plan) -> _Traced:
    return _Traced(plan)


class DecodeStep:
    """``step(tokens[B, 1]) -> logits[B, vocab]``: one decode step of ``model`` over ``cache`` (plain
    ``KVCache``s, from ``make_cache``), which it grows when full and advances; ``step.prefill(tokens[B, L])``
    puts a prompt chunk in first.

    ``compile=False`` runs the same step op by op; ``lanes`` defaults to :func:`cpu_lanes`. If compiling
    fails (a backend without support), the step warns once and falls back to the model's own forward pass.
    """

    def __init__(self, model: nn.Module, cache: list, compile: bool = True, lanes: int | None = None):
        self.model, self.cache = model, cache
        plan, self.params = plan_and_params(model, lanes or cpu_lanes())
        self.traced = _traced(plan)
        self.compiled = compile
        self.fallback = False
        self.max_positions = max(model.args.max_context_length, model.args.rope_max_length)
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
        """Logits ``[B, vocab]`` after ``tokens[B, 1]``, through the compiled step (unless ``compile=False``)."""
        return self._run(tokens, self.compiled)

    def prefill(self, tokens: mx.array) -> mx.array:
        """Put ``tokens[B, L]`` into the cache through the same step run op by op (its length varies, so it is
        not compiled; its matmuls are big enough that the host work does not matter). Logits of the last."""
        return self._run(tokens, False)

    def _run(self, tokens: mx.array, compiled: bool) -> mx.array:
        if self.fallback:
            return self.model(tokens, cache=self.cache)[:, -1, :]
        cache = self.cache
        if tokens.dtype != mx.uint32:  # the prompt's dtype and the sampler's may differ: one trace for both
            tokens = tokens.astype(mx.uint32)
        (B, L), offset = tokens.shape, cache[0].offset
        if offset + L > self.max_positions:
            raise ValueError(f"position {offset + L} is past the {self.max_positions} the model supports")
        if cache[0].keys is None or offset + L > cache[0].keys.shape[2]:
            self.reserve(offset + L, B)
        window = attention_window(offset + L, cache[0].keys.shape[2])
        args = (tokens, mx.array(offset, dtype=mx.int32), window, [c.keys for c in cache], [c.values for c in cache],
                self.params)
        if not compiled:
            logits, keys, values = self.traced.forward(*args)
        else:
            try:
                logits, keys, values = self.traced.fn(*args)
            except Exception as e:  # whatever a backend cannot compile, the model's own path computes the same
                warnings.warn(f"compiled decode step unavailable ({e}); using the uncompiled path", stacklevel=3)
                self.fallback = True
                return self._run(tokens, False)
        for c, k, v in zip(cache, keys, values):
            c.keys, c.values = k, v
            c.offset += L
        return logits
