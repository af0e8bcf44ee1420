"""The share of a job each process takes under ``mlx.launch``, and the collectives that bring results together.

One process without ``mlx.launch`` is a group of one. Work is split by batch (batch i goes to rank i mod N), so
every batch is computed with the same shapes whatever the number of processes: results are bit-identical to a
single process's. Collectives run where the backend module says: the CPU stream for ring and MPI, the GPU stream
for NCCL (MLX's CUDA backend).

A job's processes never wait for one that has stopped: each step's work runs inside :func:`exchange`, so a process
whose work raised tells the others at the step's collective and every one of them stops with one line; a process
that died or hangs is caught by a watchdog on every collective (``MLX_OPENELM_COLLECTIVE_TIMEOUT`` seconds, default
1800), which ends the waiting process with status 1. Before any work the processes compare a digest of their input
and settings (:func:`agree_on_job`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx

from .. import backend

TIMEOUT_VARIABLE, DEFAULT_TIMEOUT = "MLX_OPENELM_COLLECTIVE_TIMEOUT", 1800.0


class RankFailed(ValueError):
    """Another process of the job failed, so this one stops too. A ``ValueError``: the CLI prints it as one line."""


def collective_timeout() -> float:
    """Seconds a process waits for the others at one collective before it gives up: the environment variable
    ``MLX_OPENELM_COLLECTIVE_TIMEOUT``, else 1800 (room for the slowest host's model load or share of a step)."""
    raw = os.environ.get(TIMEOUT_VARIABLE)
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{TIMEOUT_VARIABLE} must be a number of seconds > 0, got {raw!r}")
    return value


def _give_up(what: str, timeout: float) -> None:
    sys.stderr.write(f"error: waited {timeout:g} s for the other processes at {what}: one of them has failed or "
                     "hangs (see its output); stopping this one\n")
    sys.stderr.flush()
    os._exit(1)


@contextlib.contextmanager
def bounded(what: str) -> Iterator[None]:
    """Wait for the other processes at ``what`` (a collective) for at most :func:`collective_timeout` seconds; past
    that the process exits with status 1 after one line on stderr. A collective blocked in MLX's C++ cannot be
    interrupted from Python, so the watchdog ends the process itself."""
    timeout = collective_timeout()
    timer = threading.Timer(timeout, _give_up, (what, timeout))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def group() -> Any:
    """This process's group (``mx.distributed.init()``, which waits for every process to connect; size 1 when not
    launched by ``mlx.launch``)."""
    with bounded("the start (connecting the processes)"):
        return mx.distributed.init()


def my_batches(n_batches: int, g: Any) -> list[int]:
    """The batch indices this rank computes: ``rank, rank + size, ...``."""
    return list(range(g.rank(), n_batches, g.size()))


def gather(obj: Any, g: Any) -> list[Any]:
    """Every rank's JSON-serializable ``obj``, in rank order, on every rank."""
    if g.size() == 1:
        return [obj]
    data, stream = json.dumps(obj).encode(), backend.collective_stream()
    lengths = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int64), group=g, stream=stream).tolist()
    padded = mx.array(list(data) + [0] * (max(lengths) - len(data)), dtype=mx.uint8)
    rows = mx.distributed.all_gather(padded[None], group=g, stream=stream)
    raw = [bytes(rows[r, :n].tolist()) for r, n in enumerate(lengths)]
    return [json.loads(b) for b in raw]


def exchange(work: Callable[[], Any], g: Any, what: str) -> list[Any]:
    """Run ``work`` here, then share its JSON-serializable result: every rank's, in rank order, on every rank.

    If ``work`` raised on any rank, every rank raises: that rank its own error, the others :class:`RankFailed`
    naming it, so none waits for a process that has stopped. The collective is :func:`bounded`. One process: just
    ``[work()]``, its errors as they are.
    """
    if g.size() == 1:
        return [work()]
    error: Exception | None = None
    try:
        value = work()
    except Exception as e:  # noqa: BLE001 - told to the others at this step's collective, then raised here
        value, error = None, e
    told = None if error is None else str(error) if isinstance(error, (ValueError, OSError)) else \
        f"{type(error).__name__}: {error}"
    try:
        with bounded(what):
            shared = gather({"value": value, "error": told}, g)
    except RuntimeError as e:  # the ring backend lost a peer: it exited
        if error is not None:
            raise error from None
        raise RankFailed(f"lost another process of this job at {what} ({e}): see its output") from None
    if error is not None:
        raise error
    failed = [(rank, s["error"]) for rank, s in enumerate(shared) if s["error"] is not None]
    if failed:
        rank, message = failed[0]
        raise RankFailed(f"process {rank} of {g.size()} failed at {what}: {message}")
    return [s["value"] for s in shared]


def digest(*parts: str | bytes) -> str:
    """The sha256 of ``parts`` (each length-prefixed, so no two different lists give the same bytes)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def agree_on_job(prepare: Callable[[], str], g: Any) -> None:
    """The first step of a job: ``prepare`` reads and checks this process's input and returns the job's
    :func:`digest` (input and settings); every process must have the same, or each raises ``ValueError``."""
    digests = exchange(prepare, g, "the start of the job")
    if len(set(digests)) > 1:
        each = ", ".join(f"process {rank}: {d[:12]}" for rank, d in enumerate(digests))
        raise ValueError(f"the processes of this job differ in their input, model or settings (digests {each}): "
                         "give every host the same files and options")
