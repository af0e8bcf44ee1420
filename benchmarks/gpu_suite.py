"""The GPU suite: one command for a machine with an NVIDIA GPU, sized to finish in about 8 minutes there.

1. a fresh virtual environment with the ``cuda`` and ``test`` extras (``--wheels DIR`` installs offline from
   downloaded wheels: such machines often reach no package index);
2. the test suite on the GPU default device (``mlx[cuda]`` makes the GPU the default; the header pytest prints
   names the device), with ``MLX_ENABLE_TF32=0``: the float32 bounds (1e-4) hold only without TF32;
3. ``tf32_error.py``: how far TF32 (MLX's default on CUDA) moves float32 logits, reported apart;
4. ``variants.py``: each kernel set and attention variant against mlx-lm, decode and prefill, and which one
   ``auto`` should pick on this device;
5. ``compare_mlx_lm.py`` for OpenELM-270M, 1.1B and 3B in bfloat16 and 4-bit;
6. ``overhead.py`` (structure-only models with the real 32000-token vocabulary);

then ``benchmarks/results/cuda-*.json`` and ``cuda-summary.md``, the table for the README. ``--dry-run`` runs every
step on tiny shapes here on the CPU (the environment reuses this one's packages instead of installing the extra)
and writes into a temporary folder, in well under 3 minutes: the check that the suite itself works.

    python benchmarks/gpu_suite.py [--wheels DIR]
    python benchmarks/gpu_suite.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SIZES = ("OpenELM-270M", "OpenELM-1_1B", "OpenELM-3B")
# Seconds allowed per step on the GPU machine; together at most the budget (TOTAL), which also cuts a step short
# when earlier ones ran long.
BUDGET = {"install": 90, "tests": 140, "tf32": 25, "variants": 60, "compare": 25, "overhead": 40}
TOTAL = 500
TESTS_ENV = {"MLX_ENABLE_TF32": "0"}  # float32 tests against their 1e-4 bounds: no TF32 (tf32_error.py reports it)


START = time.perf_counter()


def run(cmd: list[str], timeout: float, log: Path, env: dict[str, str] | None = None) -> tuple[int, float]:
    """Run ``cmd`` from the repo root (``env`` added to this environment), its output appended to ``log``;
    ``(exit code, seconds)`` (124: timed out, or no time left of :data:`TOTAL`)."""
    tic = time.perf_counter()
    timeout = min(timeout, TOTAL - (tic - START))
    if timeout <= 0:
        return 124, 0.0
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(f'{k}={v}' for k, v in (env or {}).items())} {' '.join(cmd)}\n")
        f.flush()
        try:
            code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - tic


def make_venv(work: Path, dry_run: bool, wheels: Path | None, log: Path) -> tuple[Path, int, float]:
    """A fresh environment with the project installed: ``(its python, exit code, seconds)``."""
    venv = work / "venv"
    code, seconds = run([sys.executable, "-m", "venv", str(venv)], 60, log)
    python = venv / "bin" / "python"
    if code:
        return python, code, seconds
    if dry_run:  # this environment's packages (the project included), without installing the cuda extra
        site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                             "['purelib'])"], text=True).strip())
        # addsitedir, not a plain path line: the parent's own .pth files (the editable install's) must run too.
        parent = sysconfig.get_paths()["purelib"]
        (site / "mlx_openelm_parent.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
        check, more = run([str(python), "-c", "import mlx.core, mlx_openelm, cli"], 60, log)
        return python, check, seconds + more
    offline = ["--no-index", "--find-links", str(wheels)] if wheels else []
    code, more = run([str(python), "-m", "pip", "install", "--quiet", *offline, "-e", f"{REPO}[cuda,test]"],
                     BUDGET["install"], log)
    return python, code, seconds + more


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every step on tiny shapes, here, into a temporary folder")
    p.add_argument("--wheels", type=Path, help="install from these downloaded wheels, without a package index")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results; --dry-run: temporary)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    out = args.out or (work / "results" if args.dry_run else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "cuda-suite.log"
    log.write_text("")
    steps: list[dict] = []

    def record(name: str, code: int, seconds: float, **extra) -> None:
        steps.append({"step": name, "exit": code, "seconds": round(seconds, 1), **extra})
        print(f"{name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s", flush=True)

    python, code, seconds = make_venv(work, args.dry_run, args.wheels, log)
    record("install", code, seconds)
    if code:
        return finish(steps, out)
    tests = ["tests/test_decode.py", "-k", "follow_the_model and 16 and float32"] if args.dry_run else []
    code, seconds = run([str(python), "-m", "pytest", "-q", "-m", "not registry", "-p", "no:cacheprovider", *tests],
                        BUDGET["tests"], log, TESTS_ENV)
    record("tests", code, seconds, env=TESTS_ENV)
    code, seconds = run([str(python), "benchmarks/tf32_error.py", "--json", str(out / "cuda-tf32.json")],
                        BUDGET["tf32"], log)
    record("tf32 error", code, seconds, json="cuda-tf32.json")
    shape = ["--structure-only", "--prompt-tokens", "16", "--gen-tokens", "4", "--rounds", "1"] if args.dry_run else \
        ["--prompt-tokens", "1024", "--gen-tokens", "64", "--rounds", "3"]
    code, seconds = run([str(python), "benchmarks/variants.py", "--preset", SIZES[0], *shape, "--json",
                         str(out / "cuda-variants.json")], BUDGET["variants"], log)
    record("variants", code, seconds, json="cuda-variants.json")
    quick = ["--structure-only", "--prompt-tokens", "8", "--gen-tokens", "4", "--trials", "1"] if args.dry_run else \
        ["--prompt-tokens", "128", "--gen-tokens", "128", "--trials", "2"]
    for size in SIZES[:1] if args.dry_run else SIZES:
        for bits in (None, 4):
            name = f"cuda-compare-{size}-{f'{bits}bit' if bits else 'bfloat16'}.json"
            cmd = [str(python), "benchmarks/compare_mlx_lm.py", "--preset", size, "--dtype", "bfloat16", *quick,
                   "--json", str(out / name), *(["-q", str(bits)] if bits else [])]
            code, seconds = run(cmd, BUDGET["compare"], log)
            record(f"compare {size} {f'{bits}-bit' if bits else 'bfloat16'}", code, seconds, json=name)
    sizes = SIZES[0] if args.dry_run else ",".join(SIZES)
    counts = ["--steps", "4", "--rounds", "1"] if args.dry_run else ["--steps", "32", "--rounds", "3"]
    code, seconds = run([str(python), "benchmarks/overhead.py", "--sizes", sizes, "--vocab", "32000", *counts,
                         "--json", str(out / "cuda-overhead.json")], BUDGET["overhead"], log)
    record("overhead", code, seconds, json="cuda-overhead.json")
    return finish(steps, out)


def finish(steps: list[dict], out: Path) -> int:
    """Write ``cuda-steps.json`` and the Markdown summary of what the steps measured; non-zero if any failed."""
    (out / "cuda-steps.json").write_text(json.dumps(steps, indent=2) + "\n")
    (out / "cuda-summary.md").write_text(summary(steps, out))
    print((out / "cuda-summary.md").read_text())
    print(f"wrote {out}")
    return 1 if any(s["exit"] for s in steps) else 0


def summary(steps: list[dict], out: Path) -> str:
    """The README table: ratios ours / mlx-lm per comparison, and the per-step overhead."""
    lines = ["| what | mlx-openelm | mlx-lm | ratio |", "|---|---:|---:|---:|"]
    for s in steps:
        path = out / s.get("json", "-")
        if s["exit"] or not path.is_file():
            continue
        data = json.loads(path.read_text())
        if "median" in data and "mlx-openelm" in data["median"]:  # compare_mlx_lm.py
            m, label = data["median"], s["step"].removeprefix("compare ")
            for key, title in (("prompt_tps", "prompt tok/s"), ("generation_tps", "generation tok/s")):
                lines.append(f"| {label} {title} | {m['mlx-openelm'][key]:.1f} | {m['mlx-lm'][key]:.1f} "
                             f"| {data['ratio'][key]:.2f} |")
        for r in data.get("overhead", []):
            m = r["median_ms"]
            lines.append(f"| decode step ms, {r['size']} structure, vocab {r['vocab_size']} | {m['mlx-openelm']:.2f} "
                         f"| {m['mlx-lm']:.2f} | {r['ratio']:.2f} |")
        for name, ratio in data["ratio"].items() if "fastest" in data else ():  # variants.py
            m = data["median"]
            lines.append(f"| {data['model']} decode ms/token, {name} | {m[name]['decode_ms']:.2f} "
                         f"| {m['mlx-lm']['decode_ms']:.2f} | {ratio['decode_ms']:.2f} |")
            lines.append(f"| {data['model']} prompt tok/s, {name} | {m[name]['prompt_tps']:.1f} "
                         f"| {m['mlx-lm']['prompt_tps']:.1f} | {ratio['prompt_tps']:.2f} |")
    notes = []
    tf32 = out / "cuda-tf32.json"
    if tf32.is_file():
        t = json.loads(tf32.read_text())
        notes.append(f"TF32: float32 logits move by {t['tf32_on_max_abs']:.3g} with TF32 (MLX's default), "
                     f"{t['tf32_off_max_abs']:.3g} with MLX_ENABLE_TF32=0, under which the tests ran (bound "
                     f"{t['bound']:g}); rounding the weights alone to TF32: {t['weights_rounded_estimate']:.3g}.")
    variants = out / "cuda-variants.json"
    if variants.is_file():
        v = json.loads(variants.read_text())
        notes.append(f"auto picks {v['auto']['decode']} for decode and {v['auto']['prefill']} for prefill; fastest "
                     f"here: {v['fastest']['decode']} and {v['fastest']['prefill']}"
                     + ("" if all(v["auto_is_fastest"].values()) else " (auto should change on this device)") + ".")
    device = next((json.loads((out / s["json"]).read_text()).get("device") for s in steps
                   if s.get("json") and (out / s["json"]).is_file()), None) or {}
    label = device.get("label") or device.get("device_name") or device.get("cpu_model")
    head = f"Device: {label}, MLX {device.get('mlx_version')} " \
           f"({device.get('backend')}); steps: " + ", ".join(f"{s['step']} {s['seconds']} s" for s in steps)
    return head + "\n\n" + "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in notes)


if __name__ == "__main__":
    sys.exit(main())
