"""``mlx-openelm serve`` whose scheduler thread dies at its first request, for tests/test_server_robust.py.

Usage: ``serve_faults.py ARGS...`` (the arguments of ``mlx-openelm serve``). The scheduler's loop raises an error that
is no ``Exception`` (as a bug in the loop's own bookkeeping, or a ``MemoryError`` inside its error handler, would end
the thread): the server must answer the request with an error, report the death on ``/health`` and exit non-zero.
"""

from __future__ import annotations

import sys

from mlx_openelm.server import scheduler


class Fatal(BaseException):
    """Escapes every ``except Exception`` of the scheduler's loop."""


def dying(self) -> None:
    raise Fatal("injected: the scheduler thread dies")


scheduler.Scheduler._log_batch = dying  # called on every pass of the loop that has work
sys.argv = ["mlx-openelm", "serve", *sys.argv[1:]]
from cli import main  # noqa: E402 - after the fault is in place

main()
