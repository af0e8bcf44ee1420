"""A compiled decode step over fixed-capacity KV caches: one forward pass, two interchangeable kernel sets.

mlx-lm runs each decode step op by op from Python; for OpenELM's small models that overhead is a large part of a
step. Here one ``mx.compile`` trace serves many steps: positions are an ``mx.array`` (one per batch row; integers
would be baked into the trace), the caches are preallocated ``[B, kv_heads, capacity, head_dim]`` buffers written
in place at each row's position, and attention reads a masked prefix whose length grows in coarse steps
(:func:`attention_window`), so a new trace is needed only every 64 or 256 tokens. The weights are inputs, not
constants, so one trace serves every model of the same structure. The numerics follow ``model.py``.

The kernels: ``"fast"`` is MLX's fused ``mx.fast.rope`` (array offsets) and ``mx.fast.scaled_dot_product_attention``
(boolean mask), what Metal and CUDA run; ``"cpu"`` is the hand-fused set of ``cpu_kernels.py`` for MLX's CPU
backend, where the matmuls (all but the smallest) are also split across one stream per core (``linear.py``).
``"auto"`` picks by the default device. Both sets run on any device, so both are tested everywhere.
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

from . import linear as lin
from .cache import KVCache
from .cpu_kernels import CpuKernels

KERNELS = ("auto", "cpu", "fast")


def attention_window(positions: int, capacity: int) -> int:
    """The cache prefix a step attends to (a static shape, so one trace per window): ``positions`` rounded up
    to a multiple of 64 up to 512, of 256 beyond, at most ``capacity``. Attention costs time in proportion to
    the keys it reads, so attending to the whole capacity would waste it."""
    step = 64 if positions <= 512 else 256
    return min(capacity, -(-positions // step) * step)


def resolve_kernels(kernels: str) -> str:
    """``"auto"`` -> ``"cpu"`` when the default device is the CPU, else ``"fast"``; others are checked."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels == "auto":
        return "cpu" if mx.default_device().type == mx.cpu else "fast"
    return kernels


class FastKernels:
    """``mx.fast.rope`` with per-row array offsets and ``mx.fast.scaled_dot_product_attention`` with a boolean mask."""

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

    def attend(self, q: mx.array, keys: mx.array, values: mx.array, mask: mx.array) -> mx.array:
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.head_dim**-0.5, mask=mask[:, None])


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
        self.compiled_forward = mx.compile(self._trace)

    def _trace(self, *args: Any) -> tuple:
        self.traces += 1  # Python runs only while mx.compile traces: this counts (re)compilations
        return self.forward(*args)

    def forward(self, tokens: mx.array, pos: mx.array, window: int, all_logits: bool, keys: list, values: list,
                params: dict) -> tuple:
        """Logits of ``tokens[B, L]`` (row b placed from position ``pos[b]``, attending to the first ``window``
        cache positions): ``[B, vocab]`` for the last token, or ``[B, L, vocab]`` with ``all_logits``; and the
        updated cache buffers."""
        p, s, kern = self.plan, self.streams, self.kernels
        (B, L), D = tokens.shape, p.head_dim
        h = _embed(tokens, params["embed"], p.embed_quant)
        dtype, h = h.dtype, h.astype(mx.float32)  # a float32 residual stream, as in the model
        positions = pos[:, None] + mx.arange(L)
        mask = mx.arange(window)[None, None] <= positions[:, :, None]  # [B, L, window]
        table = kern.positions(params, positions)
        slots = positions[:, None, :, None]  # where each row's new keys and values go
        new_keys, new_values = [], []
        for lp, quant, (nq, nkv), k_cache, v_cache in zip(params["layers"], p.quant, p.heads, keys, values):
            qkv_w, out_w, up_w, down_w = lp["linears"]
            x = mx.fast.rms_norm(h, lp["attn_norm"], p.eps).astype(dtype)
            qkv = lin.linear(x, qkv_w, quant[0], s)
            # One token: [B, 1, heads * D] -> [B, heads, 1, D] is a reshape, no transpose.
            qkv = qkv.reshape(B, -1, 1, D) if L == 1 else qkv.reshape(B, L, -1, D).transpose(0, 2, 1, 3)
            qk, v = mx.split(qkv, [nq + nkv], axis=1)
            # q and k together: one norm, one RoPE, in float32 like the model, rounded once.
            qk = kern.rope(mx.fast.rms_norm(qk.astype(mx.float32), None, p.eps), lp, pos, table)
            q, k = mx.split(qk.astype(v.dtype), [nq], axis=1)
            k_cache = mx.put_along_axis(k_cache, mx.broadcast_to(slots, k.shape), k, axis=2)
            v_cache = mx.put_along_axis(v_cache, mx.broadcast_to(slots, v.shape), v, axis=2)
            new_keys.append(k_cache)
            new_values.append(v_cache)
            out = kern.attend(q, k_cache[:, :, :window], v_cache[:, :, :window], mask)
            out = out.reshape(B, 1, -1) if L == 1 else out.transpose(0, 2, 1, 3).reshape(B, L, -1)
            h = h + lin.linear(out, out_w, quant[1], s)
            x = mx.fast.rms_norm(h, lp["ffn_norm"], p.eps).astype(dtype)
            gate, up = mx.split(lin.linear(x, up_w, quant[2], s), 2, axis=-1)
            h = h + lin.linear(nn.silu(gate) * up, down_w, quant[3], s)
        x = mx.fast.rms_norm(h if all_logits else h[:, -1:], params["norm"], p.eps).astype(dtype)
        logits = lin.linear(x, params["head"], p.embed_quant, s)
        return (logits if all_logits else logits[:, 0, :]), new_keys, new_values


@functools.cache
def _step_function(plan: Plan, thread: int) -> StepFunction:
    return StepFunction(plan)


def step_function(plan: Plan) -> StepFunction:
    """The step function of ``plan`` for this thread (cached: its traces use this thread's lane streams)."""
    return _step_function(plan, threading.get_ident())


class DecodeStep:
    """The decode step of ``model`` over a :class:`~mlx_openelm.cache.KVCache`, which it grows when full and advances:
    ``step(cache, tokens[B, 1]) -> logits[B, vocab]``, each row at its own position. ``step.prefill(cache,
    tokens[B, L])`` puts prompt chunks in (op by op: their lengths vary); ``step.verify(cache, tokens[B, L])``
    returns the logits of every position (one compiled trace per length, for speculative decoding; undo with the
    cache's ``trim``). One step serves any number of caches of its model.

    ``kernels``: ``"auto"``, ``"cpu"`` or ``"fast"`` (see the module docstring); lanes (default
    :func:`~mlx_openelm.linear.cpu_lanes`) apply on the CPU backend only. ``compile=False`` runs the same step op
    by op. The first call of every new shape is evaluated at once: if it fails (a backend without a kernel or
    without compile support), the step warns once and runs the model's own forward pass for good.
    """

    def __init__(self, model: nn.Module, compile: bool = True, lanes: int | None = None, kernels: str = "auto"):
        self.model, self.compile = model, compile
        lanes = 1 if mx.default_device().type != mx.cpu else lanes or lin.cpu_lanes()
        plan, self.params = plan_and_params(model, lanes, resolve_kernels(kernels))
        self.fn = step_function(plan)
        self.fallback = False
        self.max_positions = model.args.max_positions
        self._checked: set[tuple] = set()

    @property
    def traces(self) -> int:
        """How many times this structure's step has been traced (compiled) in this process."""
        return self.fn.traces

    @property
    def kernels(self) -> str:
        """The kernel set in use: ``"cpu"`` or ``"fast"``."""
        return self.fn.plan.kernels

    def __call__(self, cache: KVCache, tokens: mx.array) -> mx.array:
        """Logits ``[B, vocab]`` after ``tokens[B, 1]``."""
        return self._run(cache, tokens, self.compile, False)

    def prefill(self, cache: KVCache, tokens: mx.array, lengths: list[int] | None = None) -> mx.array:
        """Put ``tokens[B, L]`` into the cache, op by op (not compiled: the lengths vary; the matmuls are big enough
        that host work does not matter). ``lengths``: the real tokens of each row when rows are right-padded to L
        (a padded position writes keys past its row's tokens, which nothing reads before they are overwritten).
        Logits of the last position."""
        return self._run(cache, tokens, False, False, lengths)

    def verify(self, cache: KVCache, tokens: mx.array) -> mx.array:
        """Logits ``[B, L, vocab]`` of every one of ``tokens[B, L]`` (compiled: one trace per length and window)."""
        return self._run(cache, tokens, self.compile, True)

    def _run(self, cache: KVCache, tokens: mx.array, compiled: bool, all_logits: bool,
             lengths: list[int] | None = None) -> mx.array:
        if self.fallback:
            logits = model_forward(self.model, cache, tokens)
            return logits if all_logits else logits[:, -1, :]
        if tokens.dtype != mx.uint32:  # the prompt's dtype and the sampler's may differ: one trace for both
            tokens = tokens.astype(mx.uint32)
        (B, L), end = tokens.shape, max(cache.positions) + tokens.shape[1]
        if end > self.max_positions:
            raise ValueError(f"position {end} is past the {self.max_positions} the model supports")
        cache.reserve(end)
        window = attention_window(end, cache.capacity)
        key = (compiled, B, L, window, cache.capacity, all_logits)
        fn = self.fn.compiled_forward if compiled else self.fn.forward
        args = (tokens, cache.positions_array(), window, all_logits, cache.keys, cache.values, self.params)
        try:
            logits, keys, values = fn(*args)
            if key not in self._checked:  # a kernel that fails only when evaluated fails here, on its first use
                mx.eval(logits, keys, values)
                self._checked.add(key)
        except Exception as e:  # whatever a backend cannot run, the model's own path computes the same
            warnings.warn(f"decode step unavailable ({type(e).__name__}: {e}); using the model's own forward pass",
                          stacklevel=3)
            self.fallback = True
            return self._run(cache, tokens, compiled, all_logits, lengths)
        cache.update(keys, values, lengths if lengths is not None else L)
        return logits


def model_forward(model: nn.Module, cache: KVCache, tokens: mx.array) -> mx.array:
    """Logits ``[B, L, vocab]`` of the model's own forward pass over ``cache`` (every row at one position), each
    layer's buffers lent to one of mlx-lm's ``KVCache`` objects, which that pass writes in place."""
    offset = cache.offset
    cache.reserve(offset + tokens.shape[1])
    layers = []
    for k, v in zip(cache.keys, cache.values):
        layer = LayerCache()
        layer.keys, layer.values, layer.offset = k, v, offset
        layers.append(layer)
    logits = model(tokens, cache=layers)
    cache.update([c.keys for c in layers], [c.values for c in layers], tokens.shape[1])
    return logits
