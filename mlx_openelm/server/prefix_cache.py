"""Prompt-prefix reuse: the KV cache of finished requests, kept in an LRU bounded in bytes.

A new prompt that starts with the tokens of an earlier request (a chat that extends a conversation) gets the keys
and values of their common prefix copied in, and only the rest is prefilled. Keys and values at a position depend
only on the tokens up to it, so any common prefix can be reused, not just a whole stored one.
"""

from __future__ import annotations

import collections

import mlx.core as mx

MIN_REUSE = 8  # shorter common prefixes are cheaper to prefill than to look up and copy


class PrefixCache:
    """Token ids -> per-layer ``(keys, values)`` of those positions, least recently used evicted first."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._entries: collections.OrderedDict[tuple[int, ...], list] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, ids: list[int], kv: list[tuple[mx.array, mx.array]]) -> None:
        """Keep the ``kv`` of ``ids`` (each layer's ``[1, kv_heads, len(ids), head_dim]``)."""
        key = tuple(ids)
        size = sum(k.nbytes + v.nbytes for k, v in kv)
        if size > self.max_bytes or len(key) < MIN_REUSE:
            return
        if key in self._entries:
            self.bytes -= sum(k.nbytes + v.nbytes for k, v in self._entries.pop(key))
        self._entries[key] = kv
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= sum(k.nbytes + v.nbytes for k, v in old)

    def lookup(self, ids: list[int]) -> list[tuple[mx.array, mx.array]] | None:
        """The kv of the longest stored prefix of ``ids`` (at most all but its last token), or None."""
        best, best_key = 0, None
        for key in self._entries:
            n = _common(key, ids, len(ids) - 1)
            if n > best:
                best, best_key = n, key
        if best < MIN_REUSE:
            return None
        self._entries.move_to_end(best_key)
        return [(k[:, :, :best], v[:, :, :best]) for k, v in self._entries[best_key]]


def _common(a: tuple[int, ...], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b[:limit]):
        if x != y:
            break
        n += 1
    return n
