"""Where one decode step's time goes: each kind of work in the project's step, timed apart at a model's real shapes.

From the decode step's own plan and weights (``decode.plan_and_params``, as ``DecodeStep`` builds them) it times,
for every layer at once in one compiled graph per part: each of the four linears (qkv, out, FFN in, FFN out), the
attention over a cache of ``--context`` positions (the CPU's mask path), and the output head; then the whole step
(``DecodeStep`` on a cache filled to ``--context``, the same position every time). "other" is the step minus the
parts: norms, RoPE, cache writes, the embedding, residuals and dispatch. For the matmuls it gives the bandwidth
reached (weight bytes / time), against the machine's (``mlx_openelm.device``), which bounds a memory-bound step.

    python benchmarks/step_profile.py --preset OpenELM-270M --dtype bfloat16 --context 192
    python benchmarks/step_profile.py --preset OpenELM-270M -q 4 --context 192
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_openelm import backend
from mlx_openelm import linear as lin
from mlx_openelm.bench import check_output, device_label, prepare_model, write_json
from mlx_openelm.cache import cache_dtype, make_cache, rounded
from mlx_openelm.decode import DecodeStep, StepFunction, attention_window, plan_and_params
from mlx_openelm.device import device_info, memory_bandwidth

RESULTS = Path(__file__).parent / "results"
LINEARS = ("qkv_proj", "out_proj", "ffn proj_1", "ffn proj_2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="OpenELM-270M", help="random weights of this size (default OpenELM-270M)")
    p.add_argument("--model", help="a converted model folder instead of random weights")
    p.add_argument("--dtype", default=None, help="bfloat16 (random default), float16 or float32")
    p.add_argument("-q", "--q-bits", type=int, default=None, help="quantize the random weights (4 or 8 bits)")
    p.add_argument("--context", type=int, default=192, help="cached positions the step attends to (default 192)")
    p.add_argument("--reps", type=int, default=40, help="timed evaluations per part (default 40)")
    p.add_argument("--json", type=Path, help="output (default benchmarks/results/step-profile-NAME.json)")
    return p.parse_args(argv)


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of one evaluation of ``fn()`` (three warm-ups first, compiling anything compiled)."""
    for _ in range(3):
        mx.eval(fn())
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def profile(model: Any, context: int, reps: int) -> dict[str, Any]:
    """Seconds per step of each part, the whole step, and the weight bytes each matmul part reads."""
    plan, params = plan_and_params(model, backend.lanes(), backend.kernels())
    fn = StepFunction(plan)
    dtype, hd, key = cache_dtype(model), plan.head_dim, mx.random.key(0)
    d = model.args.model_dim
    parts: dict[str, dict[str, Any]] = {}

    def linear_part(k: int, in_width: Callable[[int], int]) -> None:
        xs = [mx.random.normal((1, 1, in_width(i)), key=key).astype(dtype) for i in range(len(plan.heads))]
        layers = params["layers"]
        run = mx.compile(lambda *x: [lin.linear(x[i], layers[i]["linears"][k], plan.quant[i][k], fn.streams)
                                     for i in range(len(x))])
        nbytes = sum(a.nbytes for lp in layers for part in lp["linears"][k] for a in part)
        parts[LINEARS[k]] = {"seconds": timed(lambda: run(*xs), reps), "weight_bytes": nbytes}

    heads, ffn = plan.heads, model.args.ffn_dims
    linear_part(0, lambda i: d)
    linear_part(1, lambda i: heads[i][0] * hd)
    linear_part(2, lambda i: d)
    linear_part(3, lambda i: ffn[i])
    # As the CPU step attends (the mask path): the window of cache positions for the token at ``context``, sliced
    # from buffers of the cache's capacity, with a boolean mask over the positions not yet written.
    window, capacity = attention_window(context + 1, rounded(context + 1)), rounded(context + 1)
    qs = [mx.random.normal((1, nq, 1, hd), key=key).astype(dtype) for nq, _ in heads]
    ks = [mx.random.normal((1, nkv, capacity, hd), key=key).astype(dtype) for _, nkv in heads]
    vs = [mx.random.normal((1, nkv, capacity, hd), key=key).astype(dtype) for _, nkv in heads]
    mask = mx.arange(window)[None, None] <= mx.array([[context]])[:, :, None]
    n = len(heads)
    attend = mx.compile(lambda *a: [fn.kernels.attend(a[i], a[n + i][:, :, :window], a[2 * n + i][:, :, :window], mask)
                                    for i in range(n)])
    parts["attention"] = {"seconds": timed(lambda: attend(*qs, *ks, *vs), reps),
                          "weight_bytes": sum(k.nbytes + v.nbytes for k, v in zip(ks, vs)) * window // capacity}
    x = mx.random.normal((1, 1, d), key=key).astype(dtype)
    head = mx.compile(lambda x: lin.linear(x, params["head"], plan.embed_quant, fn.streams))
    parts["output head"] = {"seconds": timed(lambda: head(x), reps),
                            "weight_bytes": sum(a.nbytes for part in params["head"] for a in part)}

    step, cache = DecodeStep(model), make_cache(model)
    prompt = mx.random.randint(0, model.args.vocab_size, (1, context), key=key).astype(mx.uint32)
    mx.eval(step.prefill(cache, prompt))
    token = mx.array([[1]], dtype=mx.uint32)

    def one_step() -> mx.array:  # the token at position ``context``, every time
        logits = step(cache, token)
        mx.eval(logits)
        cache.trim(1)
        return logits

    whole = timed(one_step, reps)
    # Can come out negative: the parts are timed apart, each with its own evaluation, so their sum is approximate.
    parts["other (norms, RoPE, cache writes, embedding, dispatch)"] = {
        "seconds": whole - sum(p["seconds"] for p in parts.values()), "weight_bytes": 0}
    return {"parts": parts, "step_seconds": whole, "kernels": plan.kernels, "lanes": plan.lanes,
            "dtype": str(dtype).removeprefix("mlx.core.")}


def table(record: dict[str, Any]) -> str:
    bw = record["bandwidth_gbps"]
    lines = ["| part | ms per step | share of the step | bytes read (MB) | GB/s reached |", "|---|---:|---:|---:|---:|"]
    for name, p in record["parts"].items():
        gbps = p["weight_bytes"] / p["seconds"] / 1e9 if p["weight_bytes"] and p["seconds"] else None
        lines.append(f"| {name} | {p['seconds'] * 1e3:.3f} | {p['seconds'] / record['step_seconds']:.0%} "
                     f"| {p['weight_bytes'] / 1e6:.1f} | {'' if gbps is None else f'{gbps:.1f}'} |")
    lines.append(f"| **whole step** | **{record['step_seconds'] * 1e3:.3f}** | 100% | | (machine: {bw:.1f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quant = f"-{args.q_bits}bit" if args.q_bits else ""
    name = f"{Path(args.model).name if args.model else args.preset}-{args.dtype or 'default'}{quant}"
    try:
        if args.context < 1 or args.reps < 1:
            raise ValueError("--context and --reps must be >= 1")
        out = check_output(args.json or RESULTS / f"step-profile-{name}.json")
        model, label = prepare_model(args.preset, args.model, args.dtype, args.q_bits)
        if args.context >= model.args.max_positions:
            raise ValueError(f"--context must be below the model's {model.args.max_positions} positions")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    record = {"model": label, "q_bits": args.q_bits, "context": args.context, **profile(model, args.context,
                                                                                         args.reps)}
    record["bandwidth_gbps"], record["bandwidth_source"] = memory_bandwidth()
    record["device"] = device_info()
    print(f"{label} {record['dtype']}{quant}, one decode token at {args.context} cached positions, "
          f"{record['kernels']} kernels, {record['lanes']} lanes; {device_label(record['device'])}; medians of "
          f"{args.reps}")
    print(table(record))
    write_json(out, record)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
