"""The machine a benchmark runs on: chip (or GPU), backend, memory, and memory bandwidth (published or measured)."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from typing import Any

import mlx.core as mx

from . import backend as _backend
from .linear import cpu_lanes, lane_streams, row_cuts

# Apple's published unified-memory bandwidths (GB/s). A tuple is (binned chip, full chip): the binned M3 Max and
# M4 Max have less bandwidth, and their GPU core count (below FULL_GPU_CORES, or at it) tells them apart. Chips
# not listed (newer ones, or an M5 Pro/Max whose figures we have not seen published) are measured instead.
APPLE_BANDWIDTH_GBPS: dict[str, float | tuple[float, float]] = {
    "M1": 68, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800,
    "M2": 100, "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800,
    "M3": 100, "M3 Pro": 150, "M3 Max": (300, 400), "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, "M4 Max": (410, 546),
    "M5": 153,
}
FULL_GPU_CORES = {"M3 Max": 40, "M4 Max": 40}
_ROW = 4096  # values per row of the bandwidth probe


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _apple_gpu_cores() -> int | None:
    out = _run(["system_profiler", "SPDisplaysDataType", "-json"])
    try:
        cores = [d.get("sppci_cores") for d in json.loads(out).get("SPDisplaysDataType", [])]
    except (ValueError, AttributeError):
        return None
    return next((int(c) for c in cores if str(c).isdigit()), None)


def _linux_cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _memory_bytes(info: dict[str, Any]) -> int | None:
    found = _backend.memory_bytes(info)  # Metal's unified memory, or the CUDA GPU's own
    if found is not None:
        return found
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def device_info() -> dict[str, Any]:
    """Chip name (and GPU cores on macOS), CPU model on Linux, memory (the GPU's own on CUDA), OS, MLX version,
    backend, and ``label``: what ran the numbers (the GPU's name on CUDA, the chip on a Mac, else the CPU model)."""
    info = mx.device_info()
    out: dict[str, Any] = {
        "backend": _backend.name(),
        "device_name": info.get("device_name"),
        "mlx_version": mx.__version__,
        "os": f"{platform.system()} {platform.release()}",
        "architecture": platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(info),
        "chip": None,
        "gpu_cores": None,
        "cpu_model": None,
    }
    if platform.system() == "Darwin":
        out["chip"] = _run(["sysctl", "-n", "machdep.cpu.brand_string"]).strip() or info.get("device_name")
        out["gpu_cores"] = _apple_gpu_cores()
    else:
        out["cpu_model"] = _linux_cpu_model()
    out["label"] = _backend.device_label(out)
    return out


def known_bandwidth(chip: str | None, gpu_cores: int | None = None) -> float | None:
    """Published bandwidth (GB/s) of an Apple M-series chip name such as ``"Apple M2 Max"``; None for any name
    not in :data:`APPLE_BANDWIDTH_GBPS` (never an exception), and for a binned chip (M3 Max, M4 Max) whose
    ``gpu_cores`` is not known.
    """
    m = re.search(r"\b(M\d+)(?:\s+(Pro|Max|Ultra))?\b", chip or "")
    value = APPLE_BANDWIDTH_GBPS.get(" ".join(p for p in m.groups() if p)) if m else None
    if isinstance(value, tuple):
        if not isinstance(gpu_cores, int):
            return None
        return float(value[1] if gpu_cores >= FULL_GPU_CORES[m.group(0)] else value[0])
    return None if value is None else float(value)


def _read(parts: list[mx.array], streams: tuple) -> None:
    sums = []
    for stream, part in zip(streams, parts):
        with mx.stream(stream or mx.default_stream(mx.default_device())):
            sums.append(part.sum(axis=-1))
    mx.eval(sums)


def measure_bandwidth(nbytes: int = 256 * 2**20, reps: int = 10, lanes: int | None = None) -> float:
    """Streaming-read bandwidth (GB/s) through MLX: the best of ``reps`` row sums over ``nbytes`` of float32.

    Row sums of 4096 values stream faster than one whole-array sum on MLX's CPU backend; the rows are split
    across the decode step's lanes (one stream per core on the CPU, any number of them), as the decode reads its
    weights; the best rep is kept because other load on the machine can only slow a rep down.
    """
    if nbytes < 4 * _ROW or reps < 1:
        raise ValueError(f"need nbytes >= {4 * _ROW} and reps >= 1, got {nbytes} and {reps}")
    x = mx.random.uniform(shape=(nbytes // (4 * _ROW), _ROW))
    mx.eval(x)
    streams = lane_streams(lanes or cpu_lanes())
    cut = row_cuts(x.shape[0], len(streams))
    parts = [x[cut[i] : cut[i + 1]] for i in range(len(streams))]
    _read(parts, streams)  # first call: kernel setup, not timed
    best = float("inf")
    for _ in range(reps):
        tic = time.perf_counter()
        _read(parts, streams)
        best = min(best, time.perf_counter() - tic)
    total = x.nbytes
    del x, parts
    mx.clear_cache()
    return total / 1e9 / best  # GB as 10^9 bytes, the unit bandwidths are published in


def memory_bandwidth(info: dict[str, Any] | None = None, probe_bytes: int = 256 * 2**20) -> tuple[float, str]:
    """``(GB/s, source)``: the published figure for a known Apple chip on Metal (``"table"``), else measured by
    :func:`measure_bandwidth` over ``probe_bytes`` (``"measured"``): an unknown or future chip is never an error."""
    info = info if info is not None else device_info()
    known = known_bandwidth(info.get("chip") or info.get("device_name"), info.get("gpu_cores"))
    if known is not None and info.get("backend") == "metal":
        return known, "table"
    return measure_bandwidth(probe_bytes), "measured"
