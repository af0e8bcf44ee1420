"""Each decode-step variant against mlx-lm on this device, and which one ``auto`` should pick here.

The variants: kernel set (``cpu``, ``fast``) x attention (``mask``: a boolean mask over a coarse window, in one
compiled trace; ``exact``: exactly the cached keys and no array mask, which CUDA's fused kernels need). For each,
one random prompt is prefilled in the backend's chunks and decoded greedily through ``DecodeStep`` (each token
queued before the previous one is read, as ``generate_step`` does); mlx-lm decodes the same prompt through its own
model and ``generate_step``. Rounds alternate the order; medians are reported: prompt tok/s (to the first token)
and ms per decode token. ``auto`` is what the project picks on this backend (``mlx_openelm.backend``); ``fastest``
is what it should pick here.

    python benchmarks/variants.py --preset OpenELM-270M --prompt-tokens 512 --gen-tokens 64 --rounds 3
    python benchmarks/variants.py --structure-only --prompt-tokens 16 --gen-tokens 4 --rounds 1   # the script only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlx_openelm import backend, load_model, make_cache, preset, save
from mlx_openelm.bench import device_label, prepare_model, write_json
from mlx_openelm.decode import DecodeStep, describe
from mlx_openelm.device import device_info
from mlx_openelm.runner import generation_stream

RESULTS = Path(__file__).parent / "results"
VARIANTS = [(k, a) for k in ("cpu", "fast") for a in ("mask", "exact")]


def ours(model: Any, prompt: mx.array, gen_tokens: int, kernels: str, attention: str) -> dict[str, Any]:
    """One run of a variant: time to the first token and ms per decode token after it."""
    step = DecodeStep(model, kernels=kernels, attention=attention)
    cache = make_cache(model)
    cache.reserve(prompt.size + gen_tokens)
    stream, chunk = generation_stream(), backend.prefill_chunk()
    mx.synchronize()
    tic = time.perf_counter()
    with mx.stream(stream):
        for start in range(0, prompt.size - 1, chunk):
            step.prefill(cache, prompt[None, start : min(start + chunk, prompt.size - 1)])
            mx.eval(cache.state)
        y = mx.argmax(step(cache, prompt[None, -1:]), axis=-1)[:, None]
        y.item()
        first = time.perf_counter()
        for _ in range(gen_tokens - 1):
            following = mx.argmax(step(cache, y), axis=-1)[:, None]
            mx.async_eval(following)
            y.item()
            y = following
        y.item()
    end = time.perf_counter()
    return {"prompt_tps": prompt.size / (first - tic), "decode_ms": (end - first) / max(1, gen_tokens - 1) * 1e3,
            "fallback": step.fallback}


def theirs(model: Any, prompt: mx.array, gen_tokens: int) -> dict[str, Any]:
    """mlx-lm's generate_step on its own model: the same figures."""
    mx.synchronize()
    tic = time.perf_counter()
    tokens = mlx_lm_generate_step(prompt, model, max_tokens=gen_tokens)
    next(tokens)
    first = time.perf_counter()
    for _ in tokens:
        pass
    end = time.perf_counter()
    return {"prompt_tps": prompt.size / (first - tic), "decode_ms": (end - first) / max(1, gen_tokens - 1) * 1e3}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both models from one saved folder; a warm-up of every side, then alternating rounds; the JSON record."""
    with tempfile.TemporaryDirectory(prefix="variants-") as tmp:
        tiny = {"model_dim": 64, "head_dim": 16, "vocab_size": 256}
        size = preset(args.preset, **tiny) if args.structure_only else args.preset
        model, _ = prepare_model(size, None, args.dtype)
        folder = save(model, Path(tmp) / "model")
        del model
        mine = load_model(folder, dtype="auto")
        other, _ = mlx_lm_load_model(Path(folder))
    prompt = mx.random.randint(0, mine.args.vocab_size, (args.prompt_tokens,), key=mx.random.key(0))
    sides = {f"{k}/{a}": (lambda k=k, a=a: ours(mine, prompt, args.gen_tokens, k, a)) for k, a in VARIANTS}
    sides["mlx-lm"] = lambda: theirs(other, prompt, args.gen_tokens)
    for fn in sides.values():  # warm-up: traces, allocations
        fn()
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in list(sides)[:: 1 if r % 2 == 0 else -1]:
            runs[name].append(sides[name]())
    keys = ("prompt_tps", "decode_ms")
    median = {n: {k: statistics.median(x[k] for x in rs) for k in keys} for n, rs in runs.items()}
    names = [f"{k}/{a}" for k, a in VARIANTS]
    auto = describe()
    picks = {"decode": f"{auto['kernels']}/{auto['attention']['decode']}",
             "prefill": f"{auto['kernels']}/{auto['attention']['prefill']}"}
    fastest = {"decode": min(names, key=lambda n: median[n]["decode_ms"]),
               "prefill": max(names, key=lambda n: median[n]["prompt_tps"])}
    return {
        "model": args.preset, "structure_only": args.structure_only, "dtype": args.dtype,
        "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "rounds": args.rounds,
        "prefill_chunk": backend.prefill_chunk(), "runs": runs, "median": median,
        "ratio": {n: {"decode_ms": median[n]["decode_ms"] / median["mlx-lm"]["decode_ms"],
                      "prompt_tps": median[n]["prompt_tps"] / median["mlx-lm"]["prompt_tps"]} for n in names},
        "fallback": {n: any(x["fallback"] for x in runs[n]) for n in names},
        "auto": picks, "fastest": fastest, "auto_is_fastest": {k: picks[k] == fastest[k] for k in picks},
        "device": device_info(),
    }


def table(record: dict[str, Any]) -> str:
    """A Markdown table: every variant and mlx-lm, the ratios, and what auto picks against the fastest."""
    m, lines = record["median"], ["| variant | prompt tok/s | decode ms/token | prompt ratio | decode ratio |",
                                  "|---|---:|---:|---:|---:|"]
    for name in m:
        ratio = record["ratio"].get(name)
        ratios = (f"{ratio['prompt_tps']:.2f}", f"{ratio['decode_ms']:.2f}") if ratio else ("-", "-")
        flags = " (fallback)" if record["fallback"].get(name) else ""
        lines.append(f"| {name}{flags} | {m[name]['prompt_tps']:.1f} | {m[name]['decode_ms']:.2f} "
                     f"| {ratios[0]} | {ratios[1]} |")
    a, f = record["auto"], record["fastest"]
    lines.append(f"\nauto picks {a['decode']} (decode) and {a['prefill']} (prefill); fastest here: {f['decode']} "
                 f"and {f['prefill']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="OpenELM-270M")
    p.add_argument("--structure-only", action="store_true", help="the preset's layers at tiny widths")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, help="output (default benchmarks/results/variants-<backend>.json)")
    args = p.parse_args(argv)
    if args.prompt_tokens < 2 or args.gen_tokens < 2 or args.rounds < 1:
        print("error: --prompt-tokens and --gen-tokens must be >= 2, --rounds >= 1", file=sys.stderr)
        return 1
    record = run(args)
    d = record["device"]
    print(f"{record['model']} {args.dtype}{' (structure only)' if args.structure_only else ''}: {args.prompt_tokens} "
          f"prompt + {args.gen_tokens} tokens; {device_label(d)}, MLX {d['mlx_version']} ({d['backend']})")
    print(table(record))
    out = args.json or RESULTS / f"variants-{d['backend']}.json"
    print(f"wrote {write_json(out, record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
