"""A compiled decode step over fixed-capacity KV caches: one forward pass, two interchangeable kernel sets.

mlx-lm runs each decode step op by op from Python; for OpenELM's small models that overhead is a large part of a
step. Here one ``mx.compile`` trace serves many steps: positions are an ``mx.array`` (one per batch row; integers
would be baked into the trace), the caches are preallocated ``[B, kv_heads, capacity, head_dim]`` buffers written
in place at each row's position, and attention reads a masked prefix whose length grows in coarse steps
(:func:`attention_window`), so a new trace is needed only every 64 or 256 tokens. The weights are inputs, not
constants, so one trace serves every model of the same structure. The numerics follow ``model.py``.

The kernels: ``"fast"`` is MLX's fused ``mx.fast.rope`` (array offsets) and ``mx.fast.scaled_dot_product_attention``,
what Metal and CUDA run; ``"cpu"`` is the hand-fused set of ``cpu_kernels.py`` for MLX's CPU backend, where the
matmuls (all but the smallest) are also split across one stream per core (``linear.py``). ``"auto"`` picks by the
backend (:mod:`mlx_openelm.backend`). Both sets run on any device, so both are tested everywhere.

Attention is handed over in one of two ways (``attention``; ``"auto"`` asks the backend module): ``"mask"``, the
coarse window with a boolean mask, inside the one compiled trace; or ``"exact"``, when every row is at one
position: the cache sliced to exactly the positions written and no array mask (``None`` for one token,
``"causal"`` for several), which is what CUDA's fused kernels accept (they refuse array masks) and what lets
Metal's causal prefill kernel skip blocks. The exact key count changes every step, so there each layer's work
before and after attention is compiled on its own and only attention runs op by op between them.
"""

from __future__ import annotations

import functools
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache as LayerCache

from . import backend
from . import linear as lin
from .cache import KVCache
from .cpu_kernels import CpuKernels


class DecodeFallbackWarning(RuntimeWarning):
    """The decode step cannot run on this backend: the model's own forward pass computes from now on."""


def attention_window(positions: int, capacity: int) -> int:
    """The cache prefix a step attends to (a static shape, so one trace per window): ``positions`` rounded up
    to a multiple of 64 up to 512, of 256 beyond, at most ``capacity``. Attention costs time in proportion to
    the keys it reads, so attending to the whole capacity would waste it."""
    step = 64 if positions <= 512 else 256
    return min(capacity, -(-positions // step) * step)


class FastKernels:
    """``mx.fast.rope`` with per-row array offsets and ``mx.fast.scaled_dot_product_attention``."""

    name = "fast"

    def __init__(self, head_dim: int, base: float):
        self.head_dim, self.base = head_dim, base

    def layer_weights(self, attn: nn.Module, qk_norm: mx.array) -> dict[str, mx.array]:
        return {}

    def model_weights(self, rows: int) -> dict[str, mx.array]:
        return {}

    def positions(self, params: dict[str, Any], positions: mx.array) -> Any:
        return None

    def rope(self, qk: mx.array, lp: dict[str, mx.array], pos: mx.array, table: Any) -> mx.array:
        return mx.fast.rope(qk * lp["qk_norm"], self.head_dim, traditional=False, base=self.base, scale=1.0,
                            offset=pos)

    def attend(self, q: mx.array, keys: mx.array, values: mx.array, mask: mx.array | str | None) -> mx.array:
        """``mask``: boolean ``[B, L, W]``, or ``None`` / ``"causal"`` over exact keys (what fused kernels take)."""
        if isinstance(mask, mx.array):
            mask = mask[:, None]
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.head_dim**-0.5, mask=mask)


_KERNEL_SETS = {"cpu": CpuKernels, "fast": FastKernels}


@dataclass(frozen=True)
class Plan:
    """The static structure a trace depends on (hashable; the weights themselves are inputs)."""

    heads: tuple[tuple[int, int], ...]  # (query heads, kv heads) per layer
    quant: tuple[tuple[lin.Quant, lin.Quant, lin.Quant, lin.Quant], ...]  # qkv_proj, out_proj, proj_1, proj_2
    embed_quant: lin.Quant
    head_dim: int
    eps: float
    rope_base: float
    lanes: int
    kernels: str


def plan_and_params(model: nn.Module, lanes: int, kernels: str) -> tuple[Plan, dict[str, Any]]:
    """The decode step's static plan and its weight inputs (row slices are views: no copies)."""
    a, t = model.args, model.transformer
    kset = _KERNEL_SETS[kernels](a.head_dim, a.rope_freq_constant)
    linears = [(b.attn.qkv_proj, b.attn.out_proj, b.ffn.proj_1, b.ffn.proj_2) for b in t.layers]
    plan = Plan(
        heads=tuple(zip(a.num_query_heads, a.num_kv_heads)),
        quant=tuple(tuple(lin.quant_of(m) for m in ms) for ms in linears),
        embed_quant=lin.quant_of(t.token_embeddings),
        head_dim=a.head_dim, eps=a.rms_norm_eps, rope_base=a.rope_freq_constant, lanes=lanes, kernels=kernels,
    )
    layers = []
    for b, ms in zip(t.layers, linears):
        # q_norm's weight for every query head, then k_norm's for every KV head: one norm for both, in float32
        # as the model computes them.
        q = mx.broadcast_to(b.attn.q_norm.weight, (b.attn.n_heads, 1, a.head_dim))
        k = mx.broadcast_to(b.attn.k_norm.weight, (b.attn.n_kv_heads, 1, a.head_dim))
        qk_norm = mx.concatenate([q, k]).astype(mx.float32)
        layers.append({"attn_norm": b.attn_norm.weight, "ffn_norm": b.ffn_norm.weight, "qk_norm": qk_norm,
                       "linears": [lin.split_rows(m, lanes) for m in ms], **kset.layer_weights(b.attn, qk_norm)})
    params = {"embed": lin.arrays_of(t.token_embeddings), "head": lin.split_rows(t.token_embeddings, lanes),
              "norm": t.norm.weight, "layers": layers,
              **kset.model_weights(a.max_positions)}
    mx.eval(params)
    return plan, params


def _embed(tokens: mx.array, w: list[mx.array], quant: lin.Quant) -> mx.array:
    if not quant:
        return w[0][tokens]
    group_size, bits, mode = quant
    biases = w[2][tokens] if len(w) > 2 else None
    return mx.dequantize(w[0][tokens], w[1][tokens], biases, group_size=group_size, bits=bits, mode=mode)


class StepFunction:
    """The forward pass of one plan, eager and compiled; shared by every model of that structure. Counts traces."""

    def __init__(self, plan: Plan):
        self.plan, self.traces = plan, 0
        self.kernels = _KERNEL_SETS[plan.kernels](plan.head_dim, plan.rope_base)
        self.streams = lin.lane_streams(plan.lanes)
        self.compiled_forward = mx.compile(self._counted(self.forward))
        # The exact-attention path: each layer's work before and after attention, compiled on its own.
        self.compiled_layers = [
            (mx.compile(self._counted(functools.partial(self.attention_in, i))),
             mx.compile(self._counted(functools.partial(self.attention_out, i))))
            for i in range(len(plan.heads))
        ]

    def _counted(self, fn: Any) -> Any:
        def trace(*args: Any) -> Any:
            self.traces += 1  # Python runs only while mx.compile traces: this counts (re)compilations
            return fn(*args)

        return trace

    def forward(self, tokens: mx.array, pos: mx.array, window: int, all_logits: bool, keys: list, values: list,
                params: dict, exact: bool = False, layers: list | None = None) -> tuple:
        """Logits of ``tokens[B, L]`` (row b placed from position ``pos[b]``, attending to the first ``window``
        cache positions): ``[B, vocab]`` for the last token, or ``[B, L, vocab]`` with ``all_logits``; and the
        updated cache buffers. ``exact``: every row ends at ``window``, and attention gets no array mask.
        ``layers``: each layer's compiled (before, after) attention pieces, for the exact path run op by op."""
        p, kern = self.plan, self.kernels
        B, L = tokens.shape
        h = _embed(tokens, params["embed"], p.embed_quant)
        dtype, h = h.dtype, h.astype(mx.float32)  # a float32 residual stream, as in the model
        positions = pos[:, None] + mx.arange(L)
        if exact:
            mask = None if L == 1 else "causal"
        else:
            mask = mx.arange(window)[None, None] <= positions[:, :, None]  # [B, L, window]
        table = kern.positions(params, positions)
        new_keys, new_values = [], []
        for i, (lp, k_cache, v_cache) in enumerate(zip(params["layers"], keys, values)):
            before, after = layers[i] if layers else (functools.partial(self.attention_in, i),
                                                      functools.partial(self.attention_out, i))
            q, k_cache, v_cache = before(h, lp, k_cache, v_cache, pos, positions, table)
            new_keys.append(k_cache)
            new_values.append(v_cache)
            h = after(h, kern.attend(q, k_cache[:, :, :window], v_cache[:, :, :window], mask), lp)
        x = mx.fast.rms_norm(h if all_logits else h[:, -1:], params["norm"], p.eps).astype(dtype)
        logits = lin.linear(x, params["head"], p.embed_quant, self.streams)
        return (logits if all_logits else logits[:, 0, :]), new_keys, new_values

    def attention_in(self, i: int, h: mx.array, lp: dict, k_cache: mx.array, v_cache: mx.array, pos: mx.array,
                     positions: mx.array, table: Any) -> tuple[mx.array, mx.array, mx.array]:
        """Layer ``i`` up to attention: the queries, and the cache buffers with this step's keys and values written
        at ``positions``. The branch computes in the cache's dtype (the model's)."""
        p, kern = self.plan, self.kernels
        (B, L, _), D, (nq, nkv), quant = h.shape, p.head_dim, p.heads[i], p.quant[i]
        x = mx.fast.rms_norm(h, lp["attn_norm"], p.eps).astype(k_cache.dtype)
        qkv = lin.linear(x, lp["linears"][0], quant[0], self.streams)
        # One token: [B, 1, heads * D] -> [B, heads, 1, D] is a reshape, no transpose.
        qkv = qkv.reshape(B, -1, 1, D) if L == 1 else qkv.reshape(B, L, -1, D).transpose(0, 2, 1, 3)
        qk, v = mx.split(qkv, [nq + nkv], axis=1)
        # q and k together: one norm, one RoPE, in float32 like the model, rounded once.
        qk = kern.rope(mx.fast.rms_norm(qk.astype(mx.float32), None, p.eps), lp, pos, table)
        q, k = mx.split(qk.astype(v.dtype), [nq], axis=1)
        slots = positions[:, None, :, None]  # where each row's new keys and values go
        k_cache = mx.put_along_axis(k_cache, mx.broadcast_to(slots, k.shape), k, axis=2)
        v_cache = mx.put_along_axis(v_cache, mx.broadcast_to(slots, v.shape), v, axis=2)
        return q, k_cache, v_cache

    def attention_out(self, i: int, h: mx.array, out: mx.array, lp: dict) -> mx.array:
        """Layer ``i`` after attention (``out[B, heads, L, D]``): output projection and feed-forward, with residuals."""
        (B, L, _), quant, s = h.shape, self.plan.quant[i], self.streams
        out = out.reshape(B, 1, -1) if L == 1 else out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        h = h + lin.linear(out, lp["linears"][1], quant[1], s)
        x = mx.fast.rms_norm(h, lp["ffn_norm"], self.plan.eps).astype(out.dtype)
        gate, up = mx.split(lin.linear(x, lp["linears"][2], quant[2], s), 2, axis=-1)
        return h + lin.linear(nn.silu(gate) * up, lp["linears"][3], quant[3], s)


@functools.cache
def _step_function(plan: Plan, thread: int) -> StepFunction:
    return StepFunction(plan)


def step_function(plan: Plan) -> StepFunction:
    """The step function of ``plan`` for this thread (cached: its traces use this thread's lane streams)."""
    return _step_function(plan, threading.get_ident())


def attention_path(kernels: str, attention: str, tokens: int, prefill: bool) -> str:
    """``"exact"`` or ``"mask"``: how a pass of ``tokens`` per row hands attention over when the rows share one
    position (with rows at different positions it is always ``"mask"``). ``"auto"`` attention asks the backend
    module for the fast set; the cpu set then masks."""
    requested = attention if attention != "auto" or backend.kernels(kernels) == "fast" else "mask"
    return backend.attention(requested, tokens, prefill)


def describe(kernels: str = "auto", attention: str = "auto") -> dict[str, Any]:
    """What a decode step built with these options runs here: its kernel set and its attention for a decode
    token and for a prompt chunk (rows at one position). Benchmarks record it."""
    return {"kernels": backend.kernels(kernels), "attention": {
        "decode": attention_path(kernels, attention, 1, False), "prefill": attention_path(kernels, attention, 2, True)}}


class DecodeStep:
    """The decode step of ``model`` over a :class:`~mlx_openelm.cache.KVCache`, which it grows when full and advances:
    ``step(cache, tokens[B, 1]) -> logits[B, vocab]``, each row at its own position. ``step.prefill(cache,
    tokens[B, L])`` puts prompt chunks in (op by op: their lengths vary); ``step.verify(cache, tokens[B, L])``
    returns the logits of every position (one compiled trace per length, for speculative decoding; undo with the
    cache's ``trim``). One step serves any number of caches of its model.

    ``kernels``: ``"auto"``, ``"cpu"`` or ``"fast"``; ``attention``: ``"auto"``, ``"mask"`` or ``"exact"`` (see the
    module docstring; ``"auto"`` asks :mod:`mlx_openelm.backend`, and applies to the fast set only). ``lanes``:
    default :func:`mlx_openelm.backend.lanes` (the cores on the CPU, 1 on a GPU); a count given splits on any
    backend. ``compile=False`` runs the same step op by op. The first call of every new shape is evaluated at once:
    if it fails (a backend without a kernel or without compile support), the step warns once
    (:class:`DecodeFallbackWarning`) and runs the model's own forward pass for good (:func:`model_forward`, which
    serves rows at different positions too).
    """

    def __init__(self, model: nn.Module, compile: bool = True, lanes: int | None = None, kernels: str = "auto",
                 attention: str = "auto"):
        backend.attention(attention, 1, False)  # checked here, chosen per call
        self.model, self.compile, self.attention = model, compile, attention
        plan, self.params = plan_and_params(model, backend.lanes(lanes), backend.kernels(kernels))
        self.fn = step_function(plan)
        self.fallback = False
        self.max_positions = model.args.max_positions
        self._checked: set[tuple] = set()

    @property
    def traces(self) -> int:
        """How many times this structure's step (or a layer piece of its exact path) has been traced (compiled)."""
        return self.fn.traces

    @property
    def kernels(self) -> str:
        """The kernel set in use: ``"cpu"`` or ``"fast"``."""
        return self.fn.plan.kernels

    def attention_for(self, cache: KVCache, tokens: int, prefill: bool, lengths: list[int] | None = None) -> str:
        """``"exact"`` or ``"mask"``: how a pass of ``tokens`` per row over ``cache`` hands attention over. Exact
        needs every row at one position (and, right-padded, of one length): otherwise garbage keys past a row's
        own position would be attended."""
        if attention_path(self.kernels, self.attention, tokens, prefill) != "exact":  # the CPU's every step
            return "mask"
        one_end = len(set(cache.positions)) == 1 and (lengths is None or set(lengths) <= {tokens})
        return "exact" if one_end else "mask"

    def __call__(self, cache: KVCache, tokens: mx.array) -> mx.array:
        """Logits ``[B, vocab]`` after ``tokens[B, 1]``."""
        return self._run(cache, tokens, self.compile, False, False)

    def prefill(self, cache: KVCache, tokens: mx.array, lengths: list[int] | None = None) -> mx.array:
        """Put ``tokens[B, L]`` into the cache, op by op (not compiled: the lengths vary; the matmuls are big enough
        that host work does not matter). ``lengths``: the real tokens of each row when rows are right-padded to L
        (a padded position writes keys past its row's tokens, which nothing reads before they are overwritten).
        Logits of the last position."""
        return self._run(cache, tokens, False, False, True, lengths)

    def verify(self, cache: KVCache, tokens: mx.array) -> mx.array:
        """Logits ``[B, L, vocab]`` of every one of ``tokens[B, L]`` (compiled: one trace per length and window)."""
        return self._run(cache, tokens, self.compile, True, False)

    def _run(self, cache: KVCache, tokens: mx.array, compiled: bool, all_logits: bool, prefill: bool,
             lengths: list[int] | None = None) -> mx.array:
        if self.fallback:
            return self._model_forward(cache, tokens, all_logits, lengths)
        if tokens.dtype != mx.uint32:  # the prompt's dtype and the sampler's may differ: one trace for both
            tokens = tokens.astype(mx.uint32)
        (B, L), end = tokens.shape, max(cache.positions) + tokens.shape[1]
        if end > self.max_positions:
            raise ValueError(f"position {end} is past the {self.max_positions} the model supports")
        cache.reserve(end)
        exact = self.attention_for(cache, L, prefill, lengths) == "exact"
        coarse = attention_window(end, cache.capacity)
        window = end if exact else coarse
        key = (compiled, exact, B, L, coarse, cache.capacity, all_logits)
        args = (tokens, cache.positions_array(), window, all_logits, cache.keys, cache.values, self.params)
        if exact:
            fn = functools.partial(self.fn.forward, exact=True, layers=self.fn.compiled_layers if compiled else None)
        else:
            fn = self.fn.compiled_forward if compiled else self.fn.forward
        try:
            logits, keys, values = fn(*args)
            if key not in self._checked:  # a kernel that fails only when evaluated fails here, on its first use
                mx.eval(logits, keys, values)
                self._checked.add(key)
        except Exception as e:  # whatever a backend cannot run, the model's own path computes the same
            warnings.warn(f"decode step unavailable ({type(e).__name__}: {e}); using the model's own forward pass",
                          DecodeFallbackWarning, stacklevel=3)
            self.fallback = True
            return self._model_forward(cache, tokens, all_logits, lengths)
        cache.update(keys, values, lengths if lengths is not None else L)
        return logits

    def _model_forward(self, cache: KVCache, tokens: mx.array, all_logits: bool,
                       lengths: list[int] | None) -> mx.array:
        logits = model_forward(self.model, cache, tokens, lengths)
        if all_logits:
            return logits
        if lengths is None:
            return logits[:, -1, :]
        return logits[mx.arange(tokens.shape[0]), mx.array(lengths) - 1]  # each row's last real token


def _lent(model: nn.Module, keys: list[mx.array], values: list[mx.array], offset: int,
          tokens: mx.array) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """The model's own forward pass over buffers lent to mlx-lm's ``KVCache`` objects (one per layer, all rows at
    ``offset``), which that pass writes in place: logits and the written buffers."""
    layers = []
    for k, v in zip(keys, values):
        layer = LayerCache()
        layer.keys, layer.values, layer.offset = k, v, offset
        layers.append(layer)
    logits = model(tokens, cache=layers)
    return logits, [c.keys for c in layers], [c.values for c in layers]


def model_forward(model: nn.Module, cache: KVCache, tokens: mx.array, lengths: list[int] | None = None) -> mx.array:
    """Logits ``[B, L, vocab]`` of the model's own forward pass over ``cache``, which it advances. Rows at one
    position run together; rows at different positions (a batch in flight), or right-padded to ``L`` with
    ``lengths`` real tokens each, run one at a time through one-row views written back, each attending to exactly
    its own keys (a padded row's logits past its tokens are zeros)."""
    B, L = tokens.shape
    lengths = [L] * B if lengths is None else list(lengths)
    cache.reserve(max(p + n for p, n in zip(cache.positions, lengths)))
    if len(set(cache.positions)) == 1 and set(lengths) == {L}:
        logits, keys, values = _lent(model, cache.keys, cache.values, cache.positions[0], tokens)
        cache.update(keys, values, L)
        return logits
    # Arrays of their own (mx.array copies lazily): writing rows into them leaves whoever shares these buffers alone.
    keys, values, rows = [mx.array(k) for k in cache.keys], [mx.array(v) for v in cache.values], []
    for i, (position, n) in enumerate(zip(cache.positions, lengths)):
        logits, k_row, v_row = _lent(model, [k[i : i + 1] for k in keys], [v[i : i + 1] for v in values], position,
                                     tokens[i : i + 1, :n])
        for layer, (k, v) in enumerate(zip(k_row, v_row)):
            keys[layer][i : i + 1] = k
            values[layer][i : i + 1] = v
        if n < L:
            logits = mx.concatenate([logits, mx.zeros((1, L - n, logits.shape[-1]), logits.dtype)], axis=1)
        rows.append(logits)
    cache.update(keys, values, lengths)
    return mx.concatenate(rows)
