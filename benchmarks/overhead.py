"""Per-step decode overhead: this project's decode against mlx-lm's, on models with OpenELM's layer structure
(layers, per-layer heads) but tiny widths (model_dim 64, head_dim 16; vocabulary 256, or ``--vocab 32000`` for the
real one, whose output head and sampling then run every step too), so a step is almost all host and kernel-launch
overhead rather than arithmetic.

Both sides load the same saved folder (mlx-lm through its own OpenELM class, ours with its default
``dtype="auto"``), get the same prompt and decode greedily through their own ``generate_step``, reading each
token as a user would; timed blocks alternate which side goes first. Reports median ms per step and the median
of the per-round ratios (ours / mlx-lm). ``--full-size -q 4`` gives the real-size 4-bit comparison (a bfloat16
model quantized, as the -Instruct checkpoints convert).

``--dtype-table`` instead times what ``dtype="auto"`` decides on: one 1280x5120 GEMV (the largest 270M
matmul) dense and 4-bit in each float type, and a real-size OpenELM-270M decode step per choice.

    python benchmarks/overhead.py --sizes OpenELM-270M,OpenELM-1_1B,OpenELM-3B --rounds 7 [--vocab 32000]
    python benchmarks/overhead.py --sizes OpenELM-270M --full-size -q 4 --steps 4 --rounds 3
    python benchmarks/overhead.py --dtype-table
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlx_openelm import generate_step, load_model, preset, random_model, save
from mlx_openelm.bench import device_label, write_json
from mlx_openelm.device import device_info
from mlx_openelm.linear import cpu_lanes

RESULTS = Path(__file__).parent / "results"
TINY = {"model_dim": 64, "head_dim": 16, "vocab_size": 256}


def ms_per_step(step_fn, model, prompt: mx.array, steps: int) -> float:
    """Milliseconds per decode step after the first token (which the prompt pass produces)."""
    tokens = step_fn(prompt, model, max_tokens=steps + 1)
    next(tokens)
    tic = time.perf_counter()
    for _ in tokens:
        pass
    return (time.perf_counter() - tic) / steps * 1e3


def overhead(size: str, dtype: str, steps: int, rounds: int, prompt_tokens: int, full_size: bool = False,
             q_bits: int | None = None, vocab: int = TINY["vocab_size"]) -> dict:
    """Alternating timed blocks of both sides on the structure-only (or ``full_size``) model of ``size``,
    quantized with ``q_bits`` (group 64) if given. Both load the same saved folder; ours with its default
    ``dtype="auto"``, mlx-lm as stored."""
    with tempfile.TemporaryDirectory() as tmp:
        model = random_model(preset(size, **({} if full_size else {**TINY, "vocab_size": vocab})), dtype=dtype)
        config = {}
        if q_bits:
            nn.quantize(model, group_size=64, bits=q_bits)
            config = {"quantization": {"group_size": 64, "bits": q_bits, "mode": "affine"}}
        folder = save(model, Path(tmp) / "model", config=config)
        del model
        sides = {"mlx-openelm": (load_model(folder, dtype="auto"), generate_step),
                 "mlx-lm": (mlx_lm_load_model(folder)[0], mlx_lm_generate_step)}
    prompt = mx.random.randint(0, sides["mlx-lm"][0].args.vocab_size, (prompt_tokens,), key=mx.random.key(0))
    for model, fn in sides.values():  # warm-up: traces, allocations
        ms_per_step(fn, model, prompt, steps)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name in list(sides)[:: 1 if r % 2 == 0 else -1]:
            times[name].append(ms_per_step(sides[name][1], sides[name][0], prompt, steps))
    ratios = [a / b for a, b in zip(times["mlx-openelm"], times["mlx-lm"])]
    return {"size": size, "dtype": dtype, "q_bits": q_bits, "full_size": full_size, "steps": steps,
            "vocab_size": sides["mlx-lm"][0].args.vocab_size,
            "prompt_tokens": prompt_tokens, "rounds": rounds,
            "layers": len(sides["mlx-lm"][0].layers), "ms_per_step": times,
            "median_ms": {k: statistics.median(v) for k, v in times.items()}, "ratio": statistics.median(ratios)}


def _gemv_ms(dtype: mx.Dtype, bits: int | None, reps: int = 20) -> float:
    w = mx.random.normal((5120, 1280), key=mx.random.key(1)) * 0.02
    x = mx.random.normal((1, 1280), key=mx.random.key(2)).astype(dtype)
    if bits:
        wq = [a.astype(dtype) if a.dtype != mx.uint32 else a for a in mx.quantize(w, 64, bits)]
        op = lambda: mx.quantized_matmul(x, *wq, transpose=True, group_size=64, bits=bits)  # noqa: E731
    else:
        wd = w.astype(dtype)
        op = lambda: x @ wd.T  # noqa: E731
    mx.eval(op())
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        mx.eval(op())
        times.append(time.perf_counter() - tic)
    return statistics.median(times) * 1e3


def _decode_ms(dtype: mx.Dtype, bits: int | None, steps: int) -> float:
    model = random_model("OpenELM-270M", dtype=mx.bfloat16)
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return ms_per_step(generate_step, model, mx.array([1, 2, 3, 4]), steps)


def dtype_table(steps: int) -> list[dict]:
    """GEMV and real-size 270M decode times per (weights, float type): the evidence for ``dtype="auto"``."""
    rows = []
    for bits in (None, 4):
        for name in ("float32", "bfloat16", "float16"):
            dtype = getattr(mx, name)
            row = {"weights": f"{bits}-bit" if bits else "dense", "dtype": name, "gemv_ms": _gemv_ms(dtype, bits)}
            row["decode_ms"] = _decode_ms(dtype, bits, steps)
            rows.append(row)
            print(f"{row['weights']:>6} {name:>9}: GEMV {row['gemv_ms']:8.2f} ms   270M decode step "
                  f"{row['decode_ms']:9.1f} ms", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="OpenELM-270M,OpenELM-1_1B,OpenELM-3B")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=64, help="decode steps per timed block")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="alternating timed blocks per side")
    p.add_argument("--full-size", action="store_true", help="real widths instead of the tiny structure-only ones")
    p.add_argument("--vocab", type=int, default=TINY["vocab_size"], help="vocabulary of the structure-only models "
                   "(OpenELM's is 32000)")
    p.add_argument("-q", "--q-bits", type=int, default=None, help="quantize the saved model (group 64)")
    p.add_argument("--dtype-table", action="store_true", help="time the choices dtype=auto makes instead")
    p.add_argument("--json", type=Path, default=None, help="output (default benchmarks/results/overhead*.json)")
    args = p.parse_args(argv)
    device = device_info()
    print(f"{device_label(device)}, MLX {device['mlx_version']} ({device['backend']}), "
          f"decode lanes {cpu_lanes()}")
    if args.dtype_table:
        record = {"dtype_table": dtype_table(args.steps), "device": device}
        print("| weights | float type | 1280x5120 GEMV (ms) | 270M decode step (ms) |\n|---|---|---:|---:|")
        for r in record["dtype_table"]:
            print(f"| {r['weights']} | {r['dtype']} | {r['gemv_ms']:.2f} | {r['decode_ms']:.1f} |")
        out = args.json or RESULTS / "overhead-dtype-table.json"
    else:
        runs = [overhead(s, args.dtype, args.steps, args.rounds, args.prompt_tokens, args.full_size, args.q_bits,
                         args.vocab) for s in args.sizes.split(",")]
        record = {"overhead": runs, "device": device}
        bits = f", {args.q_bits}-bit" if args.q_bits else ""
        kind = f"{args.dtype}{bits}, {'full' if args.full_size else f'tiny widths, vocab {args.vocab}'}"
        print(f"| model ({kind}) | layers | mlx-openelm ms/step | mlx-lm ms/step | ratio |")
        print("|---|---:|---:|---:|---:|")
        for r in runs:
            m = r["median_ms"]
            print(f"| {r['size']} | {r['layers']} | {m['mlx-openelm']:.2f} | {m['mlx-lm']:.2f} | {r['ratio']:.3f} |")
        vocab = "" if args.full_size or args.vocab == TINY["vocab_size"] else f"-vocab{args.vocab}"
        name = f"{args.dtype}{f'-{args.q_bits}bit' if args.q_bits else ''}{'-full' if args.full_size else vocab}"
        out = args.json or RESULTS / f"overhead-{name}.json"
    print(f"wrote {write_json(out, record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
