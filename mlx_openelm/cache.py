"""KV caches. The project's own :class:`KVCache` (fixed capacity, a position per row) is what the decode step, the
batch engine and the prompt-prefix cache hold. mlx-lm's rotating and quantized caches appear only where the
model's own forward pass runs (``max_kv_size`` / ``kv_bits``, or mlx-lm's code driving the model).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache

STEP = 256  # capacity grows in whole steps, so a compiled step sees a new buffer shape only this often


def rounded(positions: int) -> int:
    """``positions`` rounded up to a whole number of :data:`STEP` (at least one)."""
    return -(-max(positions, 1) // STEP) * STEP


def cache_dtype(model: Any) -> mx.Dtype:
    """The dtype the model computes in (and its KV cache holds): its embedding's, or the scales' when quantized."""
    emb = model.transformer.token_embeddings
    return getattr(emb, "scales", emb.weight).dtype


class KVCache:
    """Keys and values of every layer, ``[rows, kv_heads, capacity, head_dim]`` each, and how many positions each
    row holds (``positions``). Buffers are allocated on first :meth:`reserve` and grow in steps of :data:`STEP`;
    positions past a row's own are garbage that no attention reads."""

    def __init__(self, kv_heads: Sequence[int], head_dim: int, dtype: mx.Dtype, rows: int = 1):
        self.kv_heads, self.head_dim, self.dtype = tuple(kv_heads), head_dim, dtype
        self.positions = [0] * rows
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []
        self._array: mx.array | None = None  # positions as an array, kept while they do not change

    @classmethod
    def like(cls, other: KVCache, rows: int = 1) -> KVCache:
        """An empty cache with ``other``'s layer widths and dtype."""
        return cls(other.kv_heads, other.head_dim, other.dtype, rows)

    @property
    def rows(self) -> int:
        return len(self.positions)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def offset(self) -> int:
        """The position of a cache whose rows all hold the same number of tokens (one sequence, or a batch of
        prompts of one length)."""
        if len(set(self.positions)) > 1:
            raise ValueError(f"the rows hold different numbers of tokens ({self.positions}): no single offset")
        return self.positions[0] if self.positions else 0

    @property
    def state(self) -> list[mx.array]:
        """The buffers (to evaluate)."""
        return [*self.keys, *self.values]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    def positions_array(self) -> mx.array:
        """``positions`` as an int32 array (the same array until they change)."""
        if self._array is None:
            self._array = mx.array(self.positions, dtype=mx.int32)
        return self._array

    def reserve(self, positions: int) -> None:
        """Make room for ``positions`` positions in every row (capacity rounded up to :data:`STEP`)."""
        need = rounded(positions)
        if need <= self.capacity:
            return
        if not self.keys:
            self.keys = [mx.zeros((self.rows, h, need, self.head_dim), self.dtype) for h in self.kv_heads]
            self.values = [mx.zeros_like(k) for k in self.keys]
        else:
            self.keys = [_padded(k, need) for k in self.keys]
            self.values = [_padded(v, need) for v in self.values]

    def update(self, keys: list[mx.array], values: list[mx.array], advance: int | Sequence[int]) -> None:
        """Take the buffers a step wrote and move each row on by ``advance`` positions (one count, or one per row)."""
        self.keys, self.values = keys, values
        if isinstance(advance, int):
            self.positions = [p + advance for p in self.positions]
            self._array = None if self._array is None else self._array + advance
        else:
            self.positions = [p + a for p, a in zip(self.positions, advance)]
            self._array = None

    def trim(self, n: int) -> int:
        """Forget the last ``n`` positions of every row (nothing is copied); returns ``n``."""
        if n:
            self.positions = [p - n for p in self.positions]
            self._array = None
        return n

    def take(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (indices, in the order given)."""
        if list(rows) == list(range(self.rows)):
            return
        self.positions = [self.positions[i] for i in rows]
        self._array = None
        if not self.positions:
            self.keys, self.values = [], []
        elif self.keys:
            index = mx.array(list(rows))
            self.keys = [k[index] for k in self.keys]
            self.values = [v[index] for v in self.values]

    def extend(self, other: KVCache) -> None:
        """Append ``other``'s rows (both sized to the larger capacity, in whole steps)."""
        if not other.keys:
            other.reserve(1)
        if not self.positions:
            self.keys, self.values = list(other.keys), list(other.values)
        else:
            self.reserve(other.capacity)
            capacity = self.capacity
            self.keys = [mx.concatenate([k, _padded(o, capacity)]) for k, o in zip(self.keys, other.keys)]
            self.values = [mx.concatenate([v, _padded(o, capacity)]) for v, o in zip(self.values, other.values)]
        self.positions = self.positions + other.positions
        self._array = None

    def row(self, i: int) -> KVCache:
        """Row ``i`` as a one-row cache (views of these buffers, no copy)."""
        out = KVCache.like(self)
        out.keys = [k[i : i + 1] for k in self.keys]
        out.values = [v[i : i + 1] for v in self.values]
        out.positions = [self.positions[i]]
        return out

    def copy_prefix(self, row: int, upto: int) -> KVCache:
        """A one-row copy of ``row``'s first ``upto`` positions, its capacity exactly ``upto``. A copy, not a view: a
        view would keep this whole buffer alive."""
        out = KVCache.like(self)
        out.keys = [mx.contiguous(k[row : row + 1, :, :upto]) for k in self.keys]
        out.values = [mx.contiguous(v[row : row + 1, :, :upto]) for v in self.values]
        out.positions = [upto]
        mx.eval(out.state)
        return out


def _padded(x: mx.array, capacity: int) -> mx.array:
    """``x`` zero-padded along the sequence axis to ``capacity`` (never cut)."""
    have = x.shape[2]
    if have >= capacity:
        return x
    pad = mx.zeros((x.shape[0], x.shape[1], capacity - have, x.shape[3]), x.dtype)
    return mx.concatenate([x, pad], axis=2)


def make_cache(model: Any, max_kv_size: int | None = None, kv_bits: int | None = None,
               kv_group_size: int | None = None) -> KVCache | list:
    """The cache for ``model``: a :class:`KVCache`, or with ``max_kv_size`` (a sliding window that keeps the first 4
    tokens) or ``kv_bits`` (4 or 8; groups of ``kv_group_size``, default 64 or the head size when smaller) mlx-lm's
    rotating or quantized caches, one per layer, which the model's own forward pass fills."""
    if kv_bits is not None and kv_bits not in (4, 8):
        raise ValueError(f"kv_bits must be 4 or 8, got {kv_bits}")
    if max_kv_size is not None and max_kv_size < 8:
        raise ValueError(f"max_kv_size must be at least 8 tokens, got {max_kv_size}")
    if max_kv_size is not None and kv_bits is not None:
        raise ValueError("a rotating cache (max_kv_size) cannot also be quantized (kv_bits): choose one")
    args, n = model.args, len(model.layers)
    if max_kv_size is not None:
        return [RotatingKVCache(max_size=max_kv_size, keep=4) for _ in range(n)]
    if kv_bits is not None:
        kv_group_size = kv_group_size or min(64, args.head_dim)
        if kv_group_size not in (32, 64, 128) or args.head_dim % kv_group_size:
            raise ValueError(f"kv_group_size {kv_group_size} must be 32, 64 or 128 and divide the head size "
                             f"{args.head_dim}")
        return [QuantizedKVCache(group_size=kv_group_size, bits=kv_bits) for _ in range(n)]
    return KVCache(args.num_kv_heads, args.head_dim, cache_dtype(model))


def cached_tokens(cache: KVCache | list) -> int:
    """How many positions a cache holds (either kind)."""
    return cache.offset if isinstance(cache, KVCache) else cache[0].offset


MIN_REUSE = 8  # shorter common prefixes are cheaper to prefill than to look up and copy


class PrefixCache:
    """Token ids -> the one-row :class:`KVCache` of those positions, least recently used evicted past ``max_bytes``.

    A new prompt that starts with the tokens of an earlier sequence (a chat that extends a conversation) gets the
    keys and values of their common prefix, and only the rest is prefilled. Keys and values at a position depend
    only on the tokens up to it, so any common prefix can be reused, not just a whole stored one.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._entries: collections.OrderedDict[tuple[int, ...], KVCache] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def worth(self, tokens: int) -> bool:
        """Whether a sequence of ``tokens`` positions is worth copying for :meth:`store` (long enough to reuse)."""
        return tokens >= MIN_REUSE and self.max_bytes > 0

    def store(self, ids: Sequence[int], cache: KVCache) -> None:
        """Keep ``cache`` (one row holding exactly ``ids``)."""
        key = tuple(ids)
        if cache.nbytes > self.max_bytes or len(key) < MIN_REUSE:
            return
        if key in self._entries:
            self.bytes -= self._entries.pop(key).nbytes
        self._entries[key] = cache
        self.bytes += cache.nbytes
        while self.bytes > self.max_bytes:
            self.bytes -= self._entries.popitem(last=False)[1].nbytes

    def lookup(self, ids: Sequence[int]) -> KVCache | None:
        """A one-row cache of the longest stored prefix of ``ids`` (at most all but its last token), or None."""
        best, best_key = 0, None
        for key in self._entries:
            n = _common(key, ids, len(ids) - 1)
            if n > best:
                best, best_key = n, key
        if best < MIN_REUSE:
            return None
        self._entries.move_to_end(best_key)
        stored = self._entries[best_key]
        out = KVCache.like(stored)
        out.keys = [k[:, :, :best] for k in stored.keys]
        out.values = [v[:, :, :best] for v in stored.values]
        out.positions = [best]
        return out


def _common(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b[:limit]):
        if x != y:
            break
        n += 1
    return n
