"""Continuous batching: independent sequences decoded together, each at its own position, through the compiled step.

A sequence joins after its prompt has been prefilled into a one-row cache (in chunks, so the scheduler can
interleave them with decode steps; the prompts in flight are prefilled together, one pass for all); joining
appends its row to the batch's KV buffers, leaving removes it. The decode step itself is the one of
``decode.py`` with a position per row; a row never sees another row's keys (each attends to its own prefix), so
a sequence decodes to the same tokens alone or in any batch.

This module computes steps; who joins and when (queues, HTTP) is the server's scheduler's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import cpu_kernels as ck
from .decode import activation_dtype, attention_window, plan_and_params, resolve_kernels, step_function
from .runner import generation_stream
from .sample import LogitsProcessor, Sampler, greedy

CAPACITY_STEP = 256


@dataclass(eq=False)
class Row:
    """One sequence in the batch: the last token (not yet fed), how many positions its cache holds, and how its
    tokens are chosen. ``tag`` is the caller's (a request)."""

    last: int
    position: int
    sampler: Sampler
    processors: list[LogitsProcessor]
    history: list[int]  # every token fed so far, for the processors
    tag: Any = None
    logprobs: mx.array | None = field(default=None, repr=False)


class Prefill:
    """A prompt being put into a one-row cache (:meth:`BatchDecoder.advance`, a chunk at a time, together with the
    other prompts in flight); :meth:`BatchDecoder.join` makes it a row. ``keys``/``values``: one buffer per layer,
    ``[1, kv_heads, capacity, head_dim]``, holding the first ``done_upto`` positions."""

    def __init__(self, ids: Sequence[int], capacity: int, keys: list[mx.array], values: list[mx.array],
                 done_upto: int = 0):
        self.ids, self.capacity, self.done_upto = list(ids), capacity, done_upto
        self.keys, self.values = keys, values

    @property
    def remaining(self) -> int:
        """Prompt tokens still to prefill (all but the last, which the first decode step feeds)."""
        return len(self.ids) - 1 - self.done_upto


class BatchDecoder:
    """The running batch of ``model``: :meth:`join` a prefilled sequence, :meth:`step` all rows one token,
    :meth:`leave`. Rows keep the order they joined in, less those that left."""

    def __init__(self, model: nn.Module, kernels: str = "auto"):
        self.model = model
        self.kernels = resolve_kernels(kernels)
        lanes = ck.cpu_lanes()
        plan, self.params = plan_and_params(model, lanes, self.kernels)
        self.fn = step_function(plan)
        self.rows: list[Row] = []
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []
        self.capacity = 0
        self.max_positions = max(model.args.max_context_length, model.args.rope_max_length)
        self.head_dim = model.args.head_dim
        self.dtype = activation_dtype(model)

    def prefill(self, ids: Sequence[int], max_tokens: int, prefix: list | None = None) -> Prefill:
        """Start putting a prompt in (then :meth:`advance` it, then :meth:`join`). ``prefix``: the keys and values
        of its first positions, reused from an earlier conversation."""
        capacity = _rounded(len(ids) + max_tokens)
        if prefix is None:
            keys = [mx.zeros((1, h, capacity, self.head_dim), self.dtype) for h in self.model.args.num_kv_heads]
            return Prefill(ids, capacity, keys, [mx.zeros_like(k) for k in keys])
        return Prefill(ids, capacity, [_padded(k, capacity) for k, _ in prefix],
                       [_padded(v, capacity) for _, v in prefix], prefix[0][0].shape[2])

    def advance(self, pres: Sequence[Prefill], chunk: int) -> None:
        """Prefill up to ``chunk`` more tokens of each of ``pres`` in one forward pass (op by op: the lengths vary).
        Rows are right-padded to the longest chunk: a padded position writes keys past its row's prompt, which no
        position of that row attends to before its own decode step overwrites them."""
        pres = [p for p in pres if p.remaining]
        if not pres:
            return
        pieces = [p.ids[p.done_upto : p.done_upto + min(chunk, p.remaining)] for p in pres]
        width = max(map(len, pieces))
        end = max(p.done_upto + width for p in pres)
        capacity = _rounded(max(end, *(p.capacity for p in pres)))
        tokens = mx.array([piece + [0] * (width - len(piece)) for piece in pieces], dtype=mx.uint32)
        start = mx.array([p.done_upto for p in pres], dtype=mx.int32)
        keys = [mx.concatenate([_padded(p.keys[i], capacity) for p in pres]) for i in range(len(pres[0].keys))]
        values = [mx.concatenate([_padded(p.values[i], capacity) for p in pres]) for i in range(len(pres[0].keys))]
        with mx.stream(generation_stream()):
            _, keys, values = self.fn.forward(tokens, start, attention_window(end, capacity), False, keys, values,
                                              self.params)
        mx.eval(keys, values)
        for row, (p, piece) in enumerate(zip(pres, pieces)):
            p.keys = [k[row : row + 1] for k in keys]
            p.values = [v[row : row + 1] for v in values]
            p.capacity, p.done_upto = capacity, p.done_upto + len(piece)

    def join(self, pre: Prefill, sampler: Sampler | None = None, processors: Sequence[LogitsProcessor] = (),
             tag: Any = None) -> Row:
        """Add a fully prefilled sequence as a row of the batch."""
        if pre.remaining:
            raise ValueError(f"{pre.remaining} prompt tokens are not prefilled yet")
        self._grow(pre.capacity)  # sized once for its prompt and budget, not grown step by step
        for layer, (k, v) in enumerate(zip(pre.keys, pre.values)):
            k, v = _padded(k, self.capacity), _padded(v, self.capacity)
            if self.rows:
                self.keys[layer] = mx.concatenate([self.keys[layer], k])
                self.values[layer] = mx.concatenate([self.values[layer], v])
            else:
                self.keys.append(k)
                self.values.append(v)
        row = Row(pre.ids[-1], pre.done_upto, sampler or greedy, list(processors), pre.ids[:-1], tag)
        self.rows.append(row)
        mx.eval(self.keys, self.values)
        return row

    def leave(self, rows: Sequence[Row]) -> None:
        """Remove ``rows`` from the batch (their cache rows are dropped)."""
        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.keys, self.values, self.capacity = [], [], 0
            return
        index = mx.array(keep)
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]
        mx.eval(self.keys, self.values)

    def row_cache(self, row: Row, upto: int) -> list[tuple[mx.array, mx.array]]:
        """Copies of the first ``upto`` cached positions of ``row`` (for the prompt-prefix cache). Copies, not
        slices: a slice would keep the whole batch buffer alive."""
        i = self.rows.index(row)
        kv = [(mx.contiguous(k[i : i + 1, :, :upto]), mx.contiguous(v[i : i + 1, :, :upto]))
              for k, v in zip(self.keys, self.values)]
        mx.eval(kv)
        return kv

    def step(self) -> list[int]:
        """Feed every row its last token; returns the next token of each row, in row order."""
        if not self.rows:
            return []
        positions = [r.position for r in self.rows]
        if max(positions) + 1 > self.max_positions:
            raise ValueError(f"position {max(positions) + 1} is past the {self.max_positions} the model supports")
        self._grow(max(positions) + 1)
        window = attention_window(max(positions) + 1, self.capacity)
        tokens = mx.array([[r.last] for r in self.rows], dtype=mx.uint32)
        with mx.stream(generation_stream()):
            logits, self.keys, self.values = self.fn.compiled(tokens, mx.array(positions, dtype=mx.int32), window,
                                                              False, self.keys, self.values, self.params)
            chosen = []
            for i, row in enumerate(self.rows):
                row.history.append(row.last)
                x = logits[i : i + 1]
                if row.processors:
                    h = mx.array(row.history)
                    for p in row.processors:
                        x = p(h, x)
                row.logprobs = x - mx.logsumexp(x, axis=-1, keepdims=True)
                chosen.append(mx.argmax(x, axis=-1) if row.sampler is greedy else row.sampler(row.logprobs))
            out = mx.concatenate(chosen).tolist()
        for row, token in zip(self.rows, out):
            row.last, row.position = token, row.position + 1
        return out

    def _grow(self, positions: int) -> None:
        need = _rounded(positions)
        if need <= self.capacity:
            return
        if self.rows:
            self.keys = [_padded(k, need) for k in self.keys]
            self.values = [_padded(v, need) for v in self.values]
        self.capacity = need


def _rounded(positions: int) -> int:
    return -(-max(positions, 1) // CAPACITY_STEP) * CAPACITY_STEP


def _padded(x: mx.array, capacity: int) -> mx.array:
    """``x[..., :capacity, :]``, zero-padded along the sequence axis when shorter."""
    have = x.shape[2]
    if have >= capacity:
        return x[:, :, :capacity]
    pad = mx.zeros((x.shape[0], x.shape[1], capacity - have, x.shape[3]), x.dtype)
    return mx.concatenate([x, pad], axis=2)
