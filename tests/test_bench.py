import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from tiny import TINY_CONFIG, tiny_args

from mlx_openelm import backend, preset, random_model, save
from mlx_openelm.bench import (
    bench,
    check_counts,
    decode_bytes_per_token,
    kv_bytes_per_token,
    model_bytes,
    parameter_count,
    prepare_model,
    result_table,
    summary_lines,
    time_generation,
    write_json,
)
from mlx_openelm.config import PRESETS
from mlx_openelm.cpu_kernels import CpuKernels
from mlx_openelm.decode import FastKernels
from mlx_openelm.device import (
    APPLE_BANDWIDTH_GBPS,
    FULL_GPU_CORES,
    known_bandwidth,
    measure_bandwidth,
    memory_bandwidth,
)
from mlx_openelm.sweep import default_sizes, parse_sizes, run_bench, sweep, sweep_markdown, write_sweep

CLI = [sys.executable, "-c", "import cli; cli.main()", "bench"]
REPO = Path(__file__).resolve().parents[1]
FAST = {"prompt_tokens": 8, "gen_tokens": 6, "trials": 2}


@pytest.fixture(scope="module")
def tiny_result():
    model, label = prepare_model(tiny_args(), dtype="float32")
    return model, bench(model, label, **FAST)


def test_bench_measures_trials_and_bytes(tiny_result):
    model, r = tiny_result
    assert len(r.trials) == FAST["trials"]
    # The warm-up really ran, with the trials' shapes; greedy decoding of one prompt repeats itself.
    assert len(r.warmup.tokens) == FAST["gen_tokens"]
    assert all(t.tokens == r.warmup.tokens for t in r.trials)
    for t in [r.warmup, *r.trials]:
        assert t.prompt_tps > 0 and t.generation_tps > 0 and 0 < t.ttft_s < t.total_s
        assert t.peak_memory_bytes >= r.model_bytes  # the weights are resident during generation
    # float32 weights: 4 bytes per parameter, the parameter count computed from the config alone.
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert r.model_bytes == 4 * parameter_count(model.args) == 4 * n_params
    kv = sum(2 * n * TINY_CONFIG["head_dim"] * 4 for n in TINY_CONFIG["num_kv_heads"])
    assert r.kv_bytes_per_token == kv
    row = 4 * TINY_CONFIG["model_dim"]
    context = FAST["prompt_tokens"] + FAST["gen_tokens"] // 2
    assert r.bytes_per_token == r.model_bytes + row + kv * context
    reached = r.bytes_per_token * r.median("generation_tps") / (r.bandwidth_gbps * 1e9)
    assert r.roofline_fraction == pytest.approx(reached)


def test_json_has_every_field(tiny_result, tmp_path):
    _, r = tiny_result
    data = json.loads(write_json(tmp_path / "b.json", r.to_dict()).read_text())
    per_trial = {"prompt_tps", "generation_tps", "ttft_s", "peak_memory_bytes"}
    assert per_trial <= set(data["median"]) and all(per_trial <= set(t) for t in data["trials"])
    for key in ("model_bytes", "bytes_per_token", "bandwidth_gbps", "bandwidth_source", "roofline_fraction",
                "warmup", "prompt_tokens", "gen_tokens", "dtype", "q_bits", "generator"):
        assert key in data
    assert {"backend", "mlx_version", "device_name", "chip", "gpu_cores", "cpu_model"} <= set(data["device"])
    assert data["median"]["generation_tps"] == pytest.approx(r.median("generation_tps"))
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


def test_bench_names_the_kernel_set_that_ran(tiny_result, tmp_path):
    # Issue #27, 6: the table, the text and the JSON say which decode path the figures time.
    _, r = tiny_result
    data = json.loads(write_json(tmp_path / "b.json", r.to_dict()).read_text())
    assert data["decode"] == {"kernels": backend.kernels(), "attention": {"decode": "mask", "prefill": "mask"},
                              "fallback": False, "fallback_reason": None}
    headers, rows = result_table(r)
    assert headers[-1] == "kernels" and {row[-1] for row in rows} == {backend.kernels()}
    assert f"decode path: {backend.kernels()} kernels" in "\n".join(summary_lines(r))


def test_bench_flags_a_decode_step_that_fell_back(monkeypatch):
    # A kernel that fails makes the step fall back to the model's own (slower) forward pass: the benchmark says so
    # instead of timing the slow path silently.
    def broken(self, q, *rest):
        return q + mx.linalg.inv(mx.zeros((2, 2)), stream=mx.cpu)[0, 0].astype(q.dtype)

    monkeypatch.setattr(CpuKernels, "attend", broken)
    monkeypatch.setattr(FastKernels, "attend", broken)
    model = random_model(tiny_args(rope_freq_constant=10500.0), "float32")  # a fresh plan: traced with the patch
    r = bench(model, "broken", prompt_tokens=4, gen_tokens=3, trials=1, bandwidth=(1.0, "x"))
    assert r.decode["fallback"] and "Inverse" in r.decode["fallback_reason"]
    assert {row[-1] for row in result_table(r)[1]} == {f"{backend.kernels()} FALLBACK"}
    assert "FALLBACK to the model's own forward pass" in "\n".join(summary_lines(r))
    assert r.to_dict()["decode"]["fallback"] is True


def test_project_generator_matches_mlx_lm_greedy(tiny_result):
    model, r = tiny_result
    prompt = mx.random.randint(0, model.args.vocab_size, (FAST["prompt_tokens"],), key=mx.random.key(0))
    theirs = time_generation(model, prompt, FAST["gen_tokens"], mlx_lm_generate_step)
    assert theirs.tokens == r.trials[0].tokens


def test_quantized_in_memory():
    dense = model_bytes(random_model(tiny_args(), "float32"))
    model, _ = prepare_model(tiny_args(), dtype="float32", q_bits=4, q_group_size=32)
    # 4-bit weights + a float32 scale and bias per 32 weights: 6 bits per weight instead of 32.
    assert model_bytes(model) < dense * 0.25
    assert decode_bytes_per_token(model, 0) > model_bytes(model)
    r = bench(model, "q4", q_bits=4, q_group_size=32, prompt_tokens=4, gen_tokens=3, trials=1, bandwidth=(1.0, "x"))
    assert r.q_bits == 4 and r.to_dict()["q_group_size"] == 32


def test_counts_must_fit_the_context(tiny_result):
    model, _ = tiny_result
    with pytest.raises(ValueError, match="context"):
        bench(model, prompt_tokens=TINY_CONFIG["max_context_length"] - 1, gen_tokens=2, trials=1)


def test_kv_bytes_follow_dtype():
    assert kv_bytes_per_token(random_model(tiny_args(), "bfloat16")) * 2 == kv_bytes_per_token(
        random_model(tiny_args(), "float32"))


def test_parameter_count_matches_published_270m():
    assert parameter_count(preset("OpenELM-270M")) / 1e6 == pytest.approx(271.5, abs=0.05)


@pytest.mark.parametrize(
    "call",
    [lambda: check_counts(0, 8, 1), lambda: check_counts(8, 1, 1), lambda: check_counts(8, 8, 0),
     lambda: prepare_model("OpenELM-9B"), lambda: prepare_model(tiny_args(), q_bits=7),
     lambda: measure_bandwidth(nbytes=0)],
)
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


PUBLISHED = {  # Apple's figures (GB/s); binned chips as (name, GPU cores)
    "M1": 68, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800, "M2": 100, "M2 Pro": 200, "M2 Max": 400,
    "M2 Ultra": 800, "M3": 100, "M3 Pro": 150, ("M3 Max", 30): 300, ("M3 Max", 40): 400, "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, ("M4 Max", 32): 410, ("M4 Max", 40): 546, "M5": 153,
}
SMALL_PROBE = 4 * 2**20


@pytest.mark.parametrize("chip", list(PUBLISHED), ids=str)
def test_every_published_chip_reads_its_bandwidth_from_the_table(chip):
    name, cores = chip if isinstance(chip, tuple) else (chip, None)
    info = {"backend": "metal", "chip": f"Apple {name}", "gpu_cores": cores}
    assert known_bandwidth(info["chip"], cores) == PUBLISHED[chip]
    assert memory_bandwidth(info, probe_bytes=SMALL_PROBE) == (PUBLISHED[chip], "table")


def test_the_table_holds_exactly_the_published_chips():
    names = {c[0] if isinstance(c, tuple) else c for c in PUBLISHED}
    assert set(APPLE_BANDWIDTH_GBPS) == names and set(FULL_GPU_CORES) == {"M3 Max", "M4 Max"}


@pytest.mark.parametrize("chip, cores", [
    ("Apple M4 Max", None), ("Apple M3 Max", "unknown"), ("Apple M5 Pro", 20), ("Apple M5 Max", 40),
    ("Apple M9 Ultra", 120), ("Apple M4 Ultra", 80), ("Apple M", None), ("M", None), ("", None), (None, None),
    ("Apple Silicon", None), ("Intel(R) Xeon(R) Processor", None), ("Apple M2 Max (Virtual)", None),
])
def test_unknown_or_binned_without_cores_is_measured_not_raised(chip, cores):
    known = known_bandwidth(chip, cores)
    gbps, source = memory_bandwidth({"backend": "metal", "chip": chip, "gpu_cores": cores}, probe_bytes=SMALL_PROBE)
    if chip == "Apple M2 Max (Virtual)":
        assert known == 400 and source == "table"  # a decorated name still names the chip
    else:
        assert known is None and source == "measured" and gbps > 0


def test_bench_runs_on_an_injected_unknown_apple_chip(tiny_result):
    model, _ = tiny_result
    r = bench(model, "tiny", prompt_tokens=4, gen_tokens=3, trials=1, probe_bytes=SMALL_PROBE,
              device={"backend": "metal", "chip": "Apple M7 Ultra", "gpu_cores": 200, "mlx_version": "x"})
    assert r.bandwidth_source == "measured" and r.bandwidth_gbps > 0 and r.roofline_fraction > 0


@pytest.mark.parametrize("lanes", [1, 2, 3, 5, 6])
def test_bandwidth_probe_works_for_any_lane_count(lanes):
    assert measure_bandwidth(nbytes=SMALL_PROBE, reps=2, lanes=lanes) > 0
    gbps, source = memory_bandwidth({"backend": "cpu", "chip": None, "device_name": "x86_64"}, probe_bytes=SMALL_PROBE)
    assert source == "measured" and gbps > 0


def test_sweep_writes_markdown_json_png(tmp_path):
    results = sweep([tiny_args()], dtype="float32", q_group_size=32, prompt_tokens=4, gen_tokens=3, trials=1,
                    bandwidth=(100.0, "given"))
    assert [r.q_bits for r in results] == [None, 8, 4] and {r.bandwidth_source for r in results} == {"given"}
    assert results[0].model_bytes > results[1].model_bytes > results[2].model_bytes
    md, js, png = write_sweep(results, tmp_path / "sweep")
    rows = [line for line in md.read_text().splitlines() if line.startswith("| 3L-64d")]
    assert [row.split("|")[2].strip() for row in rows] == ["float32", "8-bit", "4-bit"]
    assert md.read_text() == sweep_markdown(results)
    assert len(json.loads(js.read_text())["results"]) == 3
    from matplotlib.image import imread

    pixels = imread(png)  # a real PNG, with the first and third default bar colours drawn
    assert pixels.shape[0] > 100 and pixels.shape[1] > 200
    colours = {tuple(int(round(255 * c)) for c in px[:3]) for px in pixels.reshape(-1, pixels.shape[-1])}
    assert (31, 119, 180) in colours and (44, 160, 44) in colours


def test_sweep_without_matplotlib_writes_markdown_and_json(tmp_path, monkeypatch):
    import mlx_openelm.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "chart_available", lambda: False)  # as on an install without the extra
    results = sweep([tiny_args()], dtype="float32", precisions=(None,), prompt_tokens=4, gen_tokens=3, trials=1,
                    bandwidth=(100.0, "given"))
    paths = write_sweep(results, tmp_path / "sweep")
    assert [p.suffix for p in paths] == [".md", ".json"] and not (tmp_path / "sweep.png").exists()


@pytest.mark.parametrize("options, message", [
    ({"model": "m", "preset_name": "OpenELM-270M"}, "give --model or --preset, not both"),
    ({"sweep_all": True, "q_bits": 4}, "--sweep benchmarks random weights at every precision"),
    ({"sweep_all": True, "prompt_lookup": 2}, "drop --model, --preset, -q, --json and the speculative options"),
    ({"out": "prefix"}, "--sizes and --out belong to --sweep"),
    ({"prompt_lookup": 2}, "speculative decoding needs a real model"),
    ({"trials": 0}, "--trials must be >= 1"),
])
def test_run_bench_rejects_option_combinations_before_loading(options, message):
    with pytest.raises(ValueError, match=message):
        run_bench(**{"progress": None, **options})


def test_run_bench_sweep_writes_and_reports_what_to_print(tmp_path, monkeypatch):
    import mlx_openelm.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "chart_available", lambda: False)
    results = sweep([tiny_args()], dtype="float32", precisions=(None,), prompt_tokens=4, gen_tokens=3, trials=1,
                    bandwidth=(100.0, "given"))
    asked = []
    monkeypatch.setattr(sweep_module, "sweep", lambda sizes, **kw: asked.append((sizes, kw)) or results)
    report = run_bench(sweep_all=True, sizes="270M", out=tmp_path / "s", prompt_tokens=4, gen_tokens=3, trials=1)
    assert asked[0][0] == ["OpenELM-270M"] and asked[0][1]["trials"] == 1
    assert report.table is None and report.text == sweep_markdown(results)
    assert report.paths == [tmp_path / "s.md", tmp_path / "s.json"] and all(p.is_file() for p in report.paths)
    assert len(report.notes) == 1 and "no PNG chart" in report.notes[0]


def test_sizes():
    assert parse_sizes("270M, 1.1b,OpenELM-3B") == ["OpenELM-270M", "OpenELM-1_1B", "OpenELM-3B"]
    for bad in ("9B", " , "):
        with pytest.raises(ValueError):
            parse_sizes(bad)
    assert default_sizes(2**40, 1e6, 128, 128, 3) == list(PRESETS)
    assert default_sizes(2**20, 1e6, 128, 128, 3) == [PRESETS[0]]  # nothing fits: the smallest anyway
    slow = default_sizes(2**40, 3.0, 128, 128, 3)
    assert slow == list(PRESETS[: len(slow)]) and len(slow) < len(PRESETS)


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_cli_runs_a_converted_folder(tmp_path):
    folder = save(random_model(tiny_args(), "float32"), tmp_path / "tiny")
    out = tmp_path / "r.json"
    p = _cli("--model", str(folder), "--prompt-tokens", "8", "--gen-tokens", "4", "--trials", "1", "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert "median" in p.stdout and "roofline" in p.stdout
    data = json.loads(out.read_text())
    assert data["model"] == "tiny" and len(data["trials"]) == 1 and data["gen_tokens"] == 4


@pytest.mark.parametrize(
    "args, message",
    [(["--preset", "OpenELM-9B"], "unknown preset"), (["--trials", "0"], "--trials"),
     (["--gen-tokens", "1"], "--gen-tokens"), (["--json", "/nonexistent-dir/b.json"], "does not exist"),
     (["--json", "/"], "is a directory")],
)
def test_cli_bad_input_is_one_line(args, message):
    p = _cli(*args)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
