"""The share of a job each process takes under ``mlx.launch``, and the collectives that bring results together.

One process without ``mlx.launch`` is a group of one. Work is split by batch (batch i goes to rank i mod N), so
every batch is computed with the same shapes whatever the number of processes: results are bit-identical to a
single process's. MLX's ring backend runs collectives on the CPU stream.
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx


def group() -> Any:
    """This process's group (``mx.distributed.init()``; size 1 when not launched by ``mlx.launch``)."""
    return mx.distributed.init()


def my_batches(n_batches: int, g: Any) -> list[int]:
    """The batch indices this rank computes: ``rank, rank + size, ...``."""
    return list(range(g.rank(), n_batches, g.size()))


def gather(obj: Any, g: Any) -> list[Any]:
    """Every rank's JSON-serializable ``obj``, in rank order, on every rank."""
    if g.size() == 1:
        return [obj]
    data = json.dumps(obj).encode()
    lengths = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int64), group=g, stream=mx.cpu).tolist()
    padded = mx.array(list(data) + [0] * (max(lengths) - len(data)), dtype=mx.uint8)
    rows = mx.distributed.all_gather(padded[None], group=g, stream=mx.cpu)
    raw = [bytes(rows[r, :n].tolist()) for r, n in enumerate(lengths)]
    return [json.loads(b) for b in raw]
