"""The device seam (``mlx_openelm.backend``) and the Metal and CUDA branches that read it, run here under simulated
backends: wired memory and buffer-cache trimming in the batch engine and its drivers, the prefill chunk, the
collective stream, device labels and memory on CUDA, the TF32 decision, and the declared minimum MLX (issue #27)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import mlx.core as mx
import pytest
from decode_util import ids
from tiny import tiny_args

import mlx_openelm.jobs.distributed as distributed
from mlx_openelm import backend, random_model
from mlx_openelm.batch import BatchEngine, Sequence
from mlx_openelm.bench import BenchResult, Trial, summary_lines
from mlx_openelm.device import device_info
from mlx_openelm.jobs.batch_generate import DEFAULTS, Item, decode_items

REPO = Path(__file__).resolve().parents[1]
WORKING_SET = 48 << 30
H100 = {"device_name": "NVIDIA H100 80GB HBM3", "architecture": "sm_90", "total_memory": 85_000_000_000,
        "free_memory": 84_000_000_000, "compute_capability_major": 9}


def test_simulate_sets_every_decision_and_nests():
    real = backend.actual()
    assert backend.name() == real and not backend.simulated()
    with backend.simulate("cuda"):
        assert backend.name() == "cuda" and backend.simulated() and backend.on_gpu()
        assert (backend.kernels(), backend.lanes(), backend.prefill_chunk(), backend.clear_cache_every()) == \
            ("fast", 1, 2048, backend.CLEAR_CACHE_EVERY)
        assert backend.attention("auto", 1, False) == backend.attention("auto", 64, True) == "exact"
        with backend.simulate("metal"):
            assert backend.name() == "metal"
            assert (backend.attention("auto", 1, False), backend.attention("auto", 64, True)) == ("mask", "exact")
            assert backend.compute_dtype(True, mx.bfloat16) is None
        assert backend.name() == "cuda"
    with backend.simulate("cpu"):
        assert (backend.kernels(), backend.prefill_chunk(), backend.clear_cache_every()) == ("cpu", 512, 0)
        assert backend.attention("auto", 1, False) == backend.attention("auto", 64, True) == "mask"
        assert backend.lanes(3) == 3 and backend.compute_dtype(True, mx.bfloat16) == mx.float32
        assert backend.wired_limit_bytes() is None and backend.collective_stream() == mx.cpu
    assert backend.name() == real
    with pytest.raises(ValueError, match="backend must be one of"):
        with backend.simulate("tpu"):
            pass


def test_the_simulated_backend_holds_in_other_threads():
    seen = []
    with backend.simulate("metal"):
        t = threading.Thread(target=lambda: seen.append(backend.name()))
        t.start()
        t.join()
    assert seen == ["metal"]


@pytest.fixture
def spies(monkeypatch):
    """Records mx.set_wired_limit and mx.clear_cache calls; the device reports a recommended working set (as Metal
    does) so a simulated Metal has something to wire."""
    calls = {"wired": [], "clear": 0}

    def set_wired_limit(n):
        calls["wired"].append(n)
        return 0 if len(calls["wired"]) == 1 else calls["wired"][-2]

    def clear_cache():
        calls["clear"] += 1

    info = mx.device_info()
    monkeypatch.setattr(mx, "device_info", lambda *a: {**info, "max_recommended_working_set_size": WORKING_SET})
    monkeypatch.setattr(mx, "set_wired_limit", set_wired_limit)
    monkeypatch.setattr(mx, "clear_cache", clear_cache)
    monkeypatch.setattr(backend, "CLEAR_CACHE_EVERY", 4)
    return calls


def _model():
    return random_model(tiny_args(rope_freq_constant=10400.0), dtype="float32", seed=1)


def test_the_engine_wires_memory_for_its_lifetime_and_trims_the_cache(spies, simulated_backend):
    # Issue #27, 4: on Metal the batch keeps the weights wired while it lives (given back on close) and, on a GPU,
    # MLX's buffer cache is trimmed every few hundred steps (4 here): rows joining and leaving reallocate the
    # whole batch's KV buffers. On the CPU neither happens.
    engine = BatchEngine(_model())
    for n in (3, 7):
        engine.add(Sequence(None, ids(1, n, seed=n)[0].tolist(), 9))
    while engine.prefilling:
        engine.prefill(16)
    while engine.running:
        engine.decode()
    assert spies["wired"] == ([WORKING_SET] if simulated_backend == "metal" else [])
    engine.close()
    engine.close()  # once is enough
    assert spies["wired"] == ([WORKING_SET, 0] if simulated_backend == "metal" else [])
    assert engine.steps == 9 and spies["clear"] == (0 if simulated_backend == "cpu" else 9 // 4)


def test_the_batch_job_closes_its_engine_and_prefills_in_the_backends_chunks(spies, simulated_backend, monkeypatch):
    # Issue #27, 3 and 4: the batch job's prefill chunk follows the backend (512 tokens a pass on the CPU, mlx-lm's
    # 2048 on a GPU, shared by the prompts joining), and its engine gives the wired memory back.
    chunks = []
    prefill = BatchEngine.prefill
    monkeypatch.setattr(BatchEngine, "prefill", lambda self, chunk: chunks.append(chunk) or prefill(self, chunk))
    items = [Item(i, ids(1, n, seed=n)[0].tolist(), 4, dict(DEFAULTS), ()) for i, n in enumerate((5, 12))]
    results = decode_items(_model(), None, items, batch_size=2)
    assert [r["completion_tokens"] for r in results] == [4, 4]
    assert chunks and set(chunks) == {max(64, backend.PREFILL_CHUNK[simulated_backend] // 2)}
    assert spies["wired"] == ([WORKING_SET, 0] if simulated_backend == "metal" else [])


@pytest.mark.parametrize("simulated_backend", ["cpu", "metal"], indirect=True)
def test_the_servers_scheduler_holds_the_wired_limit_until_it_stops(spies, simulated_backend):
    from mlx_openelm.server.scheduler import Scheduler

    scheduler = Scheduler(_model(), None)
    scheduler.stop()
    assert spies["wired"] == ([WORKING_SET, 0] if simulated_backend == "metal" else [])


class _Group:
    def rank(self):
        return 0

    def size(self):
        return 2


def test_collectives_run_on_the_gpu_stream_under_nccl(monkeypatch, simulated_backend):
    # Issue #27, 5: with the NCCL backend (what mlx.launch picks on CUDA; it sets NCCL_HOST_IP) a collective on the
    # CPU stream asks for a CUDA encoder on a CPU stream. Ring and MPI keep the CPU stream.
    streams = []

    def all_gather(x, group=None, stream=None):
        streams.append(stream)
        return mx.concatenate([x, x])

    monkeypatch.setattr(mx.distributed, "all_gather", all_gather)
    monkeypatch.setenv("NCCL_HOST_IP", "127.0.0.1")
    assert distributed.gather({"a": 1}, _Group()) == [{"a": 1}, {"a": 1}]
    assert streams == [mx.gpu if simulated_backend == "cuda" else mx.cpu] * 2
    monkeypatch.delenv("NCCL_HOST_IP")
    streams.clear()
    distributed.gather([1], _Group())
    assert streams == [mx.cpu] * 2  # mlx.launch --backend ring on a CUDA machine


@pytest.mark.parametrize("simulated_backend", ["cuda"], indirect=True)
def test_a_cuda_run_is_labelled_with_the_gpu_and_sized_by_its_memory(monkeypatch, simulated_backend):
    # Issue #27, 7: on CUDA the label is the GPU, not the host's CPU, and the memory is the GPU's (CUDA's
    # mx.device_info() calls it total_memory; Metal's memory_size).
    monkeypatch.setattr(mx, "device_info", lambda *a: dict(H100))
    d = device_info()
    assert d["backend"] == "cuda" and d["label"] == H100["device_name"] and d["memory_bytes"] == H100["total_memory"]
    trial = Trial(1.0, 1.0, 1.0, 2.0, 1, [1, 2])
    result = BenchResult("m", "bfloat16", None, None, 1, 2, trial, [trial], 1, 1, 1, 1, 1.0, "measured", d)
    assert f"device: {H100['device_name']}; MLX" in summary_lines(result)[1]


@pytest.mark.parametrize("simulated_backend", ["metal"], indirect=True)
def test_metal_memory_is_the_unified_memory(monkeypatch, simulated_backend):
    monkeypatch.setattr(mx, "device_info", lambda *a: {"device_name": "applegpu_g15s", "memory_size": 64 << 30})
    assert device_info()["memory_bytes"] == 64 << 30


def test_tf32_is_a_fact_of_the_real_device_and_its_flag(monkeypatch):
    # Issue #27, 2: the float32 bounds hold without TF32; a simulated backend computes on this CPU (no TF32).
    monkeypatch.setattr(backend, "actual", lambda: "cuda")
    monkeypatch.delenv("MLX_ENABLE_TF32", raising=False)
    assert backend.tf32()
    monkeypatch.setenv("MLX_ENABLE_TF32", "0")
    assert not backend.tf32()
    monkeypatch.setattr(backend, "actual", lambda: "cpu")
    monkeypatch.setenv("MLX_ENABLE_TF32", "1")
    with backend.simulate("cuda"):
        assert not backend.tf32()


def test_the_declared_minimum_mlx_has_every_api_the_code_calls():
    # Issue #27, 8: runner.generation_stream calls mx.new_thread_local_stream, first in MLX 0.31.2.
    assert "mx.new_thread_local_stream" in (REPO / "mlx_openelm" / "runner.py").read_text()
    specs = re.findall(r'"(mlx(?:\[\w+\])?>=[^";]+)', (REPO / "pyproject.toml").read_text())  # mlx, mlx[cpu], mlx[cuda]
    assert len(specs) == 3
    for spec in specs:
        version = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", spec).group(1).split("."))
        assert version >= backend.MIN_MLX, spec
