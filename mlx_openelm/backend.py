"""Every "which backend am I on?" decision, in one place: CPU, Metal or CUDA.

The backend is read from ``mx.default_device()`` (and ``mx.metal.is_available()``) unless a test sets it with
:func:`simulate`: then every decision below follows the simulated backend while the arrays still live where MLX put
them (on this CPU), so the Metal and CUDA branches run in the tests of a machine that has neither. Nothing here runs
at import; nothing here mutates the environment.

The facts behind the decisions (MLX 0.32): on CUDA the fused attention kernels (the single-query vector kernel and
cuDNN) refuse an array mask, so a decode token must come without one; Metal's kernels take boolean masks, but its
causal prefill kernel skips masked blocks only for ``mask="causal"``; mlx-lm prefills 2048 tokens per chunk on a
GPU; Metal wires the weights (``mx.set_wired_limit``) and MLX's buffer cache is trimmed every few hundred steps
(mlx-lm's server and ``BatchGenerator``); NCCL runs collectives on the GPU stream, ring and MPI on the CPU's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import mlx.core as mx

BACKENDS = ("cpu", "metal", "cuda")
KERNELS = ("auto", "cpu", "fast")
ATTENTION = ("auto", "mask", "exact")
# mx.new_thread_local_stream (runner.generation_stream) first appears in MLX 0.31.2: pyproject.toml says so too.
MIN_MLX = (0, 31, 2)
PREFILL_CHUNK = {"cpu": 512, "metal": 2048, "cuda": 2048}  # tokens per prefill pass (mlx-lm: 2048 on a GPU)
CLEAR_CACHE_EVERY = 256  # batched decode steps between two mx.clear_cache() on a GPU (mlx-lm: 256 and 512)

_SIMULATED: list[str] = []  # a stack: simulate() nests


def actual() -> str:
    """The backend MLX really runs the default device on: ``"cpu"``, ``"metal"`` or ``"cuda"``."""
    if mx.default_device().type == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def name() -> str:
    """The backend every decision follows: the simulated one inside :func:`simulate`, else :func:`actual`."""
    return _SIMULATED[-1] if _SIMULATED else actual()


def simulated() -> bool:
    """Whether the decisions follow a simulated backend (the arithmetic then still runs where MLX puts it)."""
    return bool(_SIMULATED)


@contextlib.contextmanager
def simulate(backend: str) -> Iterator[str]:
    """Make every decision of this module follow ``backend`` (``"cpu"``, ``"metal"`` or ``"cuda"``) inside the
    block, in every thread (the server's scheduler runs in its own). For tests."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    _SIMULATED.append(backend)
    try:
        yield backend
    finally:
        _SIMULATED.pop()


def on_gpu() -> bool:
    """Metal or CUDA."""
    return name() != "cpu"


def kernels(requested: str = "auto") -> str:
    """The decode step's kernel set: ``"auto"`` is ``"cpu"`` (hand-fused for MLX's CPU backend) on the CPU and
    ``"fast"`` (``mx.fast`` RoPE and attention) on a GPU; ``"cpu"`` and ``"fast"`` are taken as given."""
    if requested not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {requested!r}")
    if requested == "auto":
        return "fast" if on_gpu() else "cpu"
    return requested


def lanes(requested: int | None = None) -> int:
    """How many streams the decode step's matmuls are split across: ``requested`` when given (any backend: the
    split is exact everywhere, so it is tested everywhere), else the usable cores (at most 8) on the CPU and 1 on a
    GPU, where one kernel already uses the whole device."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"lanes must be >= 1, got {requested}")
        return requested
    if on_gpu():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


def attention(requested: str, tokens: int, prefill: bool) -> str:
    """How the ``"fast"`` kernel set hands attention to MLX for ``tokens`` new tokens per row: ``"exact"`` slices
    the cache to exactly the positions written and passes no array mask (``None`` for one token, ``"causal"`` for
    several; only possible when every row is at one position), ``"mask"`` attends to a coarse window with a
    boolean mask (one compiled trace per window). ``"auto"``: exact on CUDA, whose fused kernels refuse array
    masks; on Metal exact for prefill only (its causal kernel skips masked blocks; a decode step keeps the single
    compiled trace, whose masks Metal's kernels take); mask on the CPU, where no kernel is fused."""
    if requested not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {requested!r}")
    if requested != "auto":
        return requested
    b = name()
    return "exact" if b == "cuda" or (b == "metal" and prefill and tokens > 1) else "mask"


def compute_dtype(quantized: bool, stored: mx.Dtype) -> mx.Dtype | None:
    """The compute dtype ``dtype="auto"`` picks (None: keep the stored one). On the CPU quantized and float16
    models compute in float32 (``load.auto_dtype`` gives the measurements); Metal and CUDA keep half precision."""
    if on_gpu():
        return None
    return mx.float32 if quantized or stored == mx.float16 else None


def prefill_chunk() -> int:
    """Prompt tokens per prefill pass: 512 on the CPU, 2048 on a GPU (mlx-lm's ``prefill_step_size``)."""
    return PREFILL_CHUNK[name()]


def wired_limit_bytes() -> int | None:
    """On Metal, the size to wire (the device's recommended working set); None elsewhere."""
    if name() != "metal":
        return None
    return mx.device_info().get("max_recommended_working_set_size") or None


def clear_cache_every() -> int:
    """Decode steps of a long-running batch between two ``mx.clear_cache()`` calls: its KV buffers are reallocated
    whenever a row joins or leaves, and a GPU allocator keeps the freed ones cached; 0 (never) on the CPU."""
    return CLEAR_CACHE_EVERY if on_gpu() else 0


def collective_stream() -> Any:
    """Where ``mx.distributed`` collectives run: NCCL (what ``mlx.launch`` picks on CUDA, and
    ``mx.distributed.init()`` tries first there) on the GPU stream; ring and MPI on the CPU stream."""
    nccl = name() == "cuda" and "NCCL_HOST_IP" in os.environ  # mlx.launch --backend nccl sets it
    return mx.gpu if nccl else mx.cpu


def tf32() -> bool:
    """Whether float32 matmuls may run in TF32 here (real backend, never simulated: the arithmetic is what
    matters): CUDA by default, and Metal on M5-class GPUs; ``MLX_ENABLE_TF32=0`` turns it off."""
    return actual() != "cpu" and os.environ.get("MLX_ENABLE_TF32", "1") != "0"


def memory_bytes(info: dict[str, Any]) -> int | None:
    """The memory the model lives in, from ``mx.device_info()``: unified memory on Metal (``memory_size``), the
    GPU's own on CUDA (``total_memory``); None on the CPU (the caller reads the host's RAM)."""
    key = {"metal": "memory_size", "cuda": "total_memory"}.get(name())
    return int(info[key]) if key and info.get(key) else None


def device_label(info: dict[str, Any]) -> str | None:
    """What ran the numbers: the GPU's name on CUDA (not the host CPU's), the chip on Metal, the CPU model on the
    CPU. ``info`` is :func:`mlx_openelm.device.device_info`'s record."""
    if name() == "cuda":
        return info.get("device_name") or info.get("cpu_model")
    return info.get("chip") or info.get("cpu_model") or info.get("device_name")
