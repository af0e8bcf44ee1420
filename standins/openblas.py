"""Re-execute a script with Debian's OpenBLAS preloaded (``apt-get install libopenblas0-pthread``).

MLX's CPU wheel bundles a reference BLAS, 20-30x slower at float32 GEMM; the stand-ins' training and evaluation
scripts use OpenBLAS when it is installed. Call :func:`preload` before importing MLX. The runtime and the tests
never do.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LIBRARY = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def preload() -> None:
    """Re-execute this process with OpenBLAS in ``LD_PRELOAD`` unless it is there, missing, or ``--no-openblas``."""
    if "--no-openblas" in sys.argv or not Path(LIBRARY).is_file() or LIBRARY in os.environ.get("LD_PRELOAD", ""):
        return
    os.environ["LD_PRELOAD"] = f"{LIBRARY} {os.environ.get('LD_PRELOAD', '')}".strip()
    os.execv(sys.executable, [sys.executable, *sys.argv])


def active() -> bool:
    """Whether this process runs with OpenBLAS preloaded."""
    return LIBRARY in os.environ.get("LD_PRELOAD", "")
