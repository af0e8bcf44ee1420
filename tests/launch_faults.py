"""The ``mlx-openelm`` command under ``mlx.launch`` with a fault in one process, for tests/test_jobs.py.

Usage: ``launch_faults.py FAULT RANK ARGS...``: runs ``mlx-openelm ARGS...`` in every process, each ``{rank}`` in
ARGS replaced by the process's rank (so processes can be given different inputs), and in process RANK:

- ``raise``: the second chunk of ``batch`` raises (an error between two collectives);
- ``hang``: the second chunk of ``batch`` never ends (a process that neither works nor exits);
- ``none``: nothing.
"""

from __future__ import annotations

import os
import sys
import time

from mlx_openelm.jobs import batch_generate

fault, target, *args = sys.argv[1:]
rank = int(os.environ.get("MLX_RANK", "0"))
if rank == int(target) and fault != "none":
    real, calls = batch_generate.decode_items, []

    def faulty(*a, **kw):
        calls.append(None)
        if len(calls) == 2:
            if fault == "raise":
                raise RuntimeError(f"injected failure in process {rank}")
            time.sleep(3600)
        return real(*a, **kw)

    batch_generate.decode_items = faulty

sys.argv = ["mlx-openelm", *(a.replace("{rank}", str(rank)) for a in args)]
from cli import main  # noqa: E402 - after the fault is in place

main()
