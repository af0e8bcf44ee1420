"""The GPU suite's own check: ``benchmarks/gpu_suite.py --dry-run`` runs every step on tiny shapes here."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run_runs_every_step(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr + (tmp_path / "cuda-suite.log").read_text()
    steps = json.loads((tmp_path / "cuda-steps.json").read_text())
    assert [s["step"] for s in steps] == ["install", "tests", "compare OpenELM-270M bfloat16",
                                          "compare OpenELM-270M 4-bit", "overhead"]
    summary = (tmp_path / "cuda-summary.md").read_text()
    assert "generation tok/s" in summary and "vocab 32000" in summary
    assert json.loads((tmp_path / "cuda-overhead.json").read_text())["overhead"][0]["vocab_size"] == 32000
