"""The project's KV cache: capacity in whole steps, a position per row, trim, take and extend rows, prefix copies;
and the prompt-prefix cache that lends them out."""

from __future__ import annotations

import mlx.core as mx
import pytest
from tiny import tiny_args

from mlx_openelm import make_cache, random_model
from mlx_openelm.cache import STEP, KVCache, PrefixCache


def _filled(rows: int, positions: int) -> KVCache:
    """A cache whose key/value at (row r, position p) is r * 1000 + p in every layer and head."""
    cache = KVCache([1, 2], head_dim=4, dtype=mx.float32, rows=rows)
    cache.reserve(positions)
    marks = mx.arange(rows)[:, None] * 1000 + mx.arange(cache.capacity)[None]
    cache.keys = [mx.broadcast_to(marks[:, None, :, None], k.shape).astype(mx.float32) for k in cache.keys]
    cache.values = [-k for k in cache.keys]
    cache.positions = [positions] * rows
    return cache


def test_make_cache_takes_the_models_widths_and_dtype():
    model = random_model(tiny_args(), dtype="bfloat16")
    cache = make_cache(model)
    assert isinstance(cache, KVCache) and cache.kv_heads == tuple(model.args.num_kv_heads)
    assert cache.dtype == mx.bfloat16 and cache.positions == [0] and cache.capacity == 0
    cache.reserve(1)
    assert cache.capacity == STEP and [k.shape for k in cache.keys] == [(1, h, STEP, model.args.head_dim)
                                                                         for h in model.args.num_kv_heads]


def test_reserve_grows_in_whole_steps_and_keeps_what_is_held():
    cache = _filled(2, 10)
    before = [mx.array(k) for k in cache.keys]
    cache.reserve(STEP)
    assert cache.capacity == STEP  # already enough
    cache.reserve(STEP + 1)
    assert cache.capacity == 2 * STEP
    assert all(mx.array_equal(k[:, :, :STEP], b).item() for k, b in zip(cache.keys, before))


def test_positions_trim_and_update():
    cache = _filled(2, 10)
    assert cache.offset == 10 and cache.positions_array().tolist() == [10, 10]
    assert cache.trim(3) == 3 and cache.offset == 7 and cache.positions_array().tolist() == [7, 7]
    cache.update(cache.keys, cache.values, [2, 5])
    assert cache.positions == [9, 12] and cache.positions_array().tolist() == [9, 12]
    with pytest.raises(ValueError, match="different numbers of tokens"):
        cache.offset  # noqa: B018


def test_take_extend_row_and_copy_prefix_move_the_right_rows():
    cache = _filled(3, 20)
    cache.take([2, 0])
    assert cache.rows == 2 and cache.keys[1][:, 0, 5, 0].tolist() == [2005, 5]
    other = _filled(1, 300)  # a larger capacity: both are padded to it
    cache.extend(other)
    assert cache.rows == 3 and cache.capacity == other.capacity and cache.positions == [20, 20, 300]
    assert cache.keys[0][:, 0, 299, 0].tolist() == [0, 0, 299]
    row = cache.row(0)
    assert row.positions == [20] and row.keys[0][0, 0, 7, 0].item() == 2007
    prefix = cache.copy_prefix(2, 50)
    assert prefix.capacity == 50 and prefix.positions == [50] and prefix.values[1][0, 1, 49, 3].item() == -49
    cache.take([])
    assert cache.rows == 0 and cache.capacity == 0


def test_prefix_cache_lends_the_longest_common_prefix_and_evicts_by_bytes():
    a, b = _filled(1, 40), _filled(1, 40)
    size = a.nbytes
    prefixes = PrefixCache(max_bytes=size + size // 2)
    prefixes.store(list(range(40)), a)
    assert prefixes.lookup([7] * 40) is None  # nothing in common
    got = prefixes.lookup(list(range(30)) + [99] * 5)
    assert got.offset == 30 and got.capacity == 30 and got.keys[0][0, 0, 29, 0].item() == 29
    assert prefixes.lookup(list(range(40))).offset == 39  # at most all but the last token
    prefixes.store(list(range(100, 140)), b)  # over the byte limit: the least recently used goes
    assert len(prefixes) == 1 and prefixes.lookup(list(range(40))) is None
