"""The same weights through mlx-openelm and through mlx-lm's own OpenELM model and generate_step.

One process, one saved model folder loaded by both projects, one random prompt, greedy; a warm-up each, then
trials alternating which side goes first. Prints prompt tok/s, generation tok/s, time to first token and peak
memory for both with the ratios (ours / mlx-lm), checks that both generate identical tokens, and writes JSON
into benchmarks/results/. Peak memory is each side's own: both models are resident, so the other model's
bytes are taken out (peak during the trial - memory active before it + this side's weights). Conversion peak
memory against mlx_lm.convert comes from benchmarks/convert_memory.py (its JSON is read; --convert-memory runs it).

    python benchmarks/compare_mlx_lm.py --preset OpenELM-270M --dtype bfloat16 --trials 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_lm.generate import generation_stream as mlx_lm_stream
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlx_openelm import load_model, preset, save
from mlx_openelm.bench import (
    check_counts,
    check_output,
    device_label,
    model_bytes,
    prepare_model,
    time_generation,
    write_json,
)
from mlx_openelm.decode import describe
from mlx_openelm.device import device_info

RESULTS = Path(__file__).parent / "results"
# Acceptance (issue #7): ours / mlx-lm.
THRESHOLDS = {"generation_tps": (">=", 1.0), "prompt_tps": (">=", 0.95), "peak_memory_bytes": ("<=", 1.05)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="OpenELM-270M", help="random weights of this size (default OpenELM-270M)")
    p.add_argument("--source-dir", type=Path, help="a converted model folder instead of random weights")
    p.add_argument("--structure-only", action="store_true", help="the preset's layers at tiny widths (a quick check "
                   "of the script itself, e.g. for benchmarks/gpu_suite.py --dry-run)")
    p.add_argument("--dtype", default=None, help="bfloat16 (random default), float16 or float32")
    p.add_argument("-q", "--q-bits", type=int, default=None, help="quantize the random weights (4 or 8 bits)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="output (default benchmarks/results/compare-*.json)")
    p.add_argument("--convert-memory", metavar="PRESET", help="first run benchmarks/convert_memory.py for PRESET "
                   "(conversion peak RSS against mlx_lm.convert; minutes, ~9 GB of disk); its latest JSON is "
                   "included either way")
    return p.parse_args(argv)


def _side(model: Any, step: Any, stream: Any, prompt: mx.array, gen_tokens: int) -> dict[str, Any]:
    """One timed generation; the peak excludes the other side's resident weights."""
    before = mx.get_active_memory()
    t = time_generation(model, prompt, gen_tokens, step, stream=stream)
    own_peak = t.peak_memory_bytes - before + model_bytes(model)
    return {"prompt_tps": t.prompt_tps, "generation_tps": t.generation_tps, "ttft_s": t.ttft_s,
            "peak_memory_bytes": own_peak, "tokens": t.tokens}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Build or read the weights, load them through both projects, alternate trials; the JSON record."""
    check_counts(args.prompt_tokens, args.gen_tokens, args.trials)
    with tempfile.TemporaryDirectory(prefix="compare-mlx-lm-") as tmp:
        folder = args.source_dir
        if folder is None:
            tiny = {"model_dim": 64, "head_dim": 16, "vocab_size": 256}
            size = preset(args.preset, **tiny) if args.structure_only else args.preset
            group = 32 if args.structure_only else 64
            model, label = prepare_model(size, None, args.dtype, args.q_bits, q_group_size=group)
            quant = {"quantization": {"group_size": group, "bits": args.q_bits, "mode": "affine"}}
            quant = quant if args.q_bits else {}
            folder = save(model, Path(tmp) / "model", config=quant)
            del model
        ours = load_model(folder, dtype=args.dtype or "auto")  # the project's default path
        theirs, _ = mlx_lm_load_model(Path(folder))
        if args.dtype:
            theirs.set_dtype(ours.transformer.norm.weight.dtype)
        mx.eval(theirs.parameters())
    prompt = mx.random.randint(0, ours.args.vocab_size, (args.prompt_tokens,), key=mx.random.key(0))
    # Greedy tokens of random weights often repeat one id, so the logits of the prompt are compared too.
    logits = [m(prompt[None]).astype(mx.float32) for m in (ours, theirs)]
    logits_diff = mx.abs(logits[0] - logits[1]).max().item()
    del logits
    sides = {"mlx-openelm": (ours, None, None), "mlx-lm": (theirs, mlx_lm_generate_step, mlx_lm_stream)}
    for model, step, stream in sides.values():  # warm-up, discarded
        time_generation(model, prompt, args.gen_tokens, step, stream=stream)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for i in range(args.trials):
        order = list(sides) if i % 2 == 0 else list(sides)[::-1]
        for name in order:
            runs[name].append(_side(*sides[name], prompt, args.gen_tokens))
    keys = ("prompt_tps", "generation_tps", "ttft_s", "peak_memory_bytes")
    median = {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in runs.items()}
    ratio = {k: median["mlx-openelm"][k] / median["mlx-lm"][k] for k in keys}
    tokens = {n: [r.pop("tokens") for r in rs] for n, rs in runs.items()}
    return {
        "model": str(args.source_dir) if args.source_dir else args.preset,
        "dtype": str(ours.transformer.norm.weight.dtype).removeprefix("mlx.core."), "q_bits": args.q_bits,
        "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "trials": runs, "median": median,
        "ratio": ratio, "model_bytes": {"mlx-openelm": model_bytes(ours), "mlx-lm": model_bytes(theirs)},
        "identical_tokens": tokens["mlx-openelm"] == tokens["mlx-lm"], "prompt_logits_max_abs_diff": logits_diff,
        "tokens": tokens["mlx-openelm"][0], "device": device_info(), "decode": describe(),
        "acceptance": {k: (ratio[k] >= v if op == ">=" else ratio[k] <= v) for k, (op, v) in THRESHOLDS.items()},
    }


def conversion_memory(preset: str | None) -> list[dict[str, Any]]:
    """The conversion peak-memory records of benchmarks/convert_memory.py (run first for ``preset`` if given)."""
    if preset:
        subprocess.run([sys.executable, str(Path(__file__).parent / "convert_memory.py"), "--preset", preset],
                       check=True)
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob("convert_memory_*.json"))]


def table(record: dict[str, Any]) -> str:
    """A Markdown table: both sides' medians, the ratio, and the acceptance bound."""
    rows = [("prompt tok/s", "prompt_tps", 1), ("generation tok/s", "generation_tps", 1),
            ("time to first token (s)", "ttft_s", 1), ("peak memory (GB)", "peak_memory_bytes", 1e9)]
    m, lines = record["median"], []
    lines.append("| metric | mlx-openelm | mlx-lm | ratio | bound |")
    lines.append("|---|---:|---:|---:|---|")
    for title, key, unit in rows:
        op, v = THRESHOLDS.get(key, ("", ""))
        ok = "" if key not in THRESHOLDS else (" pass" if record["acceptance"][key] else " FAIL")
        lines.append(f"| {title} | {m['mlx-openelm'][key] / unit:.3f} | {m['mlx-lm'][key] / unit:.3f} "
                     f"| {record['ratio'][key]:.3f} | {op} {v}{ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quant = f"-{args.q_bits}bit" if args.q_bits else ""
    name = (args.source_dir.name if args.source_dir else args.preset) + f"-{args.dtype or 'default'}{quant}"
    try:
        out = check_output(args.json or RESULTS / f"compare-{name}.json")
        record = compare(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    d = record["device"]
    print(f"{record['model']} {record['dtype']}{quant}: {args.prompt_tokens} prompt + {args.gen_tokens} generated "
          f"tokens, median of {args.trials} alternating trials; {device_label(d)}, "
          f"MLX {d['mlx_version']} ({d['backend']}; {record['decode']['kernels']} kernels)")
    print(table(record))
    print(f"identical greedy tokens: {record['identical_tokens']} ({len(set(record['tokens']))} distinct ids); "
          f"prompt logits max |difference| {record['prompt_logits_max_abs_diff']:.3g}")
    record["conversion_memory"] = conversion_memory(args.convert_memory)
    for c in record["conversion_memory"]:
        print(f"conversion peak RSS, {c['preset']} {c['conversion']}: mlx-openelm {c['ours']['peak_rss_mb']} MB, "
              f"mlx_lm.convert {c['mlx_lm']['peak_rss_mb']} MB "
              f"(ratio {c['ours']['peak_rss_mb'] / c['mlx_lm']['peak_rss_mb']:.3f})")
    if not record["conversion_memory"]:
        print("conversion peak memory: none recorded yet; add --convert-memory OpenELM-1_1B to measure it")
    write_json(out, record)
    print(f"wrote {out}")
    return 0 if record["identical_tokens"] else 2


if __name__ == "__main__":
    sys.exit(main())
