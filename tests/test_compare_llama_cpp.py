"""``benchmarks/compare_llama_cpp.py`` end to end on the memorizing model, against a real llama.cpp build.

llama.cpp is not in the test install (building it takes about 5 minutes on 2 cores, and its converter needs
torch, a CUDA wheel of several GB from PyPI on Linux): the end-to-end test skips, saying what is missing, unless
llama-cpp-python is installed and ``LLAMA_CPP_DIR`` names a llama.cpp source tree
(docs/benchmarks.md#llamacpp-on-the-same-weights). Its refusals are checked everywhere.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "compare_llama_cpp.py"
HOW = "see docs/benchmarks.md#llamacpp-on-the-same-weights"


def _script(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _llama_cpp_dir() -> Path:
    """The llama.cpp source tree to convert with, or a skip naming what is missing."""
    missing = [m for m in ("llama_cpp", "torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"llama.cpp comparison not run: {', '.join(missing)} not installed ({HOW})")
    source = os.environ.get("LLAMA_CPP_DIR")
    if not source or not (Path(source) / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp comparison not run: LLAMA_CPP_DIR does not name a llama.cpp source tree ({HOW})")
    return Path(source)


def test_compare_llama_cpp_end_to_end(trained_checkpoint, tmp_path):
    source = _llama_cpp_dir()
    out = tmp_path / "compare.json"
    run = _script("--llama-cpp", str(source), "--checkpoint", str(trained_checkpoint.path), "--precisions",
                  "bf16,f16,q8,q4", "--prompt-tokens", "4,12", "--gen-tokens", "6", "--trials", "2", "--agree-tokens",
                  "6", "--work-dir", str(tmp_path / "work"), "--json", str(out), timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert [(r["precision"], r["gguf_type"], r["prompt_tokens"]) for r in rows] == [
        (p, t, n) for p, t in (("bf16", "BF16"), ("f16", "F16"), ("q8", "Q8_0"), ("q4", "Q4_0")) for n in (4, 12)]
    for r in rows:
        for side in ("mlx-openelm", "llama.cpp"):
            assert len(r["trials"][side]) == 2
            m = r["median"][side]
            assert m["prompt_tps"] > 0 and m["generation_tps"] > 0 and 0 < m["ttft_s"] < 60 and m["cores"] > 0
            assert r["peak_rss_growth_bytes"][side] > 0 and r["file_bytes"][side] > 0
        assert r["ratio"]["generation_tps"] == pytest.approx(
            r["median"]["mlx-openelm"]["generation_tps"] / r["median"]["llama.cpp"]["generation_tps"])
        if r["precision"] in ("bf16", "f16"):
            # The memorizing model's margins (6 logits) leave no near-ties: every greedy token must agree.
            a = r["agreement"]
            assert a["checked"] == 6 and a["first_difference"] is None and a["agree"] == 6, a
            assert a["mlx-openelm"] == a["llama.cpp"]
        else:
            assert r["agreement"] is None
    # Each side's files: a quantized model is smaller than its float one on both sides.
    size = {r["precision"]: r["file_bytes"] for r in rows}
    for side in ("mlx-openelm", "llama.cpp"):
        assert size["q4"][side] < size["q8"][side] < size["bf16"][side]
    assert record["tokens_agree"] is True
    assert record["llama_cpp_gpu"] in (True, False) and record["llama_cpp_system"]
    assert record["versions"]["llama-cpp-python"] and record["device"]["label"]
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| ") == 1 + len(rows) and "x** |" in table


@pytest.mark.parametrize("args, message", [
    (["--precisions", "bf16,int3"], "--precisions: int3; choose from bf16, f16, q8, q4"),
    (["--prompt-tokens", "0"], "--prompt-tokens must be >= 1"),
    (["--gen-tokens", "1"], "--gen-tokens must be >= 2"),
    (["--checkpoint", "/nonexistent"], "--checkpoint /nonexistent has no config.json"),
])
def test_bad_settings_are_one_line_before_anything_runs(args, message):
    run = _script(*args)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith(f"error: {message}") and len(run.stderr.strip().splitlines()) == 1


def test_a_missing_llama_cpp_is_named(tmp_path):
    run = _script("--llama-cpp", str(tmp_path), "--preset", "OpenELM-270M")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    if importlib.util.find_spec("llama_cpp") is None:
        assert run.stderr.strip() == f"error: llama-cpp-python is not installed: {HOW}"
    else:
        assert run.stderr.strip() == f"error: --llama-cpp {tmp_path} has no convert_hf_to_gguf.py: give a llama.cpp " \
                                     "source tree"


def _module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import compare_llama_cpp
    finally:
        sys.path.pop(0)
    return compare_llama_cpp


def test_agreement_names_the_first_step_where_the_sides_differ():
    agreement = _module().agreement
    same = agreement({"mlx-openelm": [5, 6, 7, 8], "llama.cpp": [5, 6, 7, 9]}, 3)
    assert same == {"checked": 3, "agree": 3, "first_difference": None, "mlx-openelm": [5, 6, 7],
                    "llama.cpp": [5, 6, 7]}
    differ = agreement({"mlx-openelm": [5, 6, 7, 8], "llama.cpp": [5, 9, 7, 8]}, 4)
    assert (differ["agree"], differ["first_difference"]) == (1, 1)


def test_the_table_gives_each_pair_its_ratios_and_agreement():
    m = _module()
    side = {"prompt_tps": 10.0, "generation_tps": 4.0, "ttft_s": 0.5, "cores": 1.9}
    theirs = {"prompt_tps": 40.0, "generation_tps": 16.0, "ttft_s": 0.1, "cores": 2.0}
    row = {"precision": "bf16", "gguf_type": "BF16", "prompt_tokens": 128, "median": {"mlx-openelm": side,
           "llama.cpp": theirs}, "ratio": {"prompt_tps": 0.25, "generation_tps": 0.25},
           "peak_rss_growth_bytes": {"mlx-openelm": 6e8, "llama.cpp": 5e8},
           "file_bytes": {"mlx-openelm": 5.4e8, "llama.cpp": 5.5e8},
           "agreement": {"agree": 7, "checked": 8}}
    record = {"model": "OpenELM-270M (random weights)", "threads": 2, "flash_attn": False, "llama_cpp_gpu": False,
              "rows": [row, {**row, "precision": "q4", "gguf_type": "Q4_0", "agreement": None}],
              "versions": {"mlx-openelm": "0.1.0", "mlx": "0.32.4", "llama-cpp-python": "0.3.36"},
              "device": {"label": "AMD EPYC", "os": "Linux", "backend": "cpu"}}
    lines = m.table(record).splitlines()
    assert "AMD EPYC" in lines[0] and "llama-cpp-python 0.3.36 (CPU build) with 2 threads" in lines[0]
    assert lines[4] == ("| bf16 vs BF16 | 128 | 10.0, 40.0, **0.25x** | 4.0, 16.0, **0.25x** | 0.500, 0.100 "
                        "| 1.9, 2.0 | 600, 500 | 540.0, 550.0 | 7/8 |")
    assert lines[5].startswith("| q4 vs Q4_0 | 128 |") and lines[5].endswith("| n/a |")
