"""Where a batched decode step's time goes at 270M size (a random OpenELM-270M, bfloat16), against mlx-lm's
batched forward on the same weights, in one run:

- ours: one step of the server's running batch (``BatchEngine.decode``: the compiled step, then each row's
  token chosen);
- ours, matmuls alone: every linear layer of that step (and the tied head) at the same batch, split across
  the same lanes, all weights read once, nothing else;
- mlx-lm: its model's forward over its own KV cache at the same batch, plus the argmax (no scheduling, no
  padding: a lower bound on a step of ``mlx_lm.server``'s batch).

mlx-lm's step over our matmuls alone bounds what any step-level work of ours can gain over it while both use
MLX's CPU matmul for the weights. Trials alternate; the figures are medians.

    python benchmarks/batch_step.py [--batches 1,8] [--steps 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlx_openelm import linear as lin
from mlx_openelm import random_model, save
from mlx_openelm.batch import BatchEngine, Sequence
from mlx_openelm.bench import write_json
from mlx_openelm.decode import plan_and_params
from mlx_openelm.device import device_info

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
PROMPT = [1, 450, 4996, 17354, 1701]


def timed(run, steps: int) -> float:
    """Median milliseconds of ``run()`` over ``steps`` calls, after two untimed ones."""
    for _ in range(2):
        run()
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        run()
        times.append(time.perf_counter() - tic)
    return 1e3 * statistics.median(times)


def ours(model, batch: int):
    engine = BatchEngine(model)
    for i in range(batch):
        engine.add(Sequence(None, PROMPT[:-1] + [PROMPT[-1] + i], 1 << 20))  # token ids only: no text to assemble
    while engine.prefilling:
        engine.prefill(len(PROMPT))
    return engine.decode


def matmuls_alone(model, batch: int, tokens: int = 1):
    """Every linear layer of the decode step (and the tied head) over ``batch`` rows of ``tokens`` tokens, through
    the step's own weight inputs and lanes, all weights read once, nothing else."""
    lanes = lin.cpu_lanes()
    streams = lin.lane_streams(lanes)
    plan, params = plan_and_params(model, lanes, "cpu")
    weights = [(params["head"], plan.embed_quant)]
    for lp, quants in zip(params["layers"], plan.quant):
        weights += zip(lp["linears"], quants)
    work = [(mx.random.normal((batch, tokens, parts[0][0].shape[1])).astype(mx.bfloat16), parts, quant)
            for parts, quant in weights]
    mx.eval([x for x, _, _ in work])
    return lambda: mx.eval([lin.linear(x, parts, quant, streams) for x, parts, quant in work])


def theirs(model, batch: int):
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([PROMPT] * batch), cache=cache))
    token = mx.array([[PROMPT[-1]]] * batch)
    return lambda: mx.eval(mx.argmax(model(token, cache=cache)[:, -1], axis=-1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=int, default=5, help="timed steps per trial")
    p.add_argument("--rounds", type=int, default=3, help="alternating trials per configuration")
    args = p.parse_args(argv)
    model = random_model("OpenELM-270M", dtype="bfloat16")
    with tempfile.TemporaryDirectory() as tmp:
        their_model = mlx_lm_load_model(save(model, Path(tmp) / "model"))[0]
    record: dict = {"model": "random OpenELM-270M bfloat16", "lanes": lin.cpu_lanes(), "device": device_info(),
                    "batches": {}}
    for batch in (int(b) for b in args.batches.split(",")):
        runs = {"mlx-openelm step": ours(model, batch), "mlx-openelm matmuls alone": matmuls_alone(model, batch),
                "mlx-lm step": theirs(their_model, batch)}
        ms: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.rounds):
            for name in list(runs)[:: 1 if r % 2 == 0 else -1]:
                ms[name].append(timed(runs[name], args.steps))
        med = {name: statistics.median(v) for name, v in ms.items()}
        record["batches"][str(batch)] = {
            "ms": ms, "median_ms": med,
            "step_ratio": med["mlx-lm step"] / med["mlx-openelm step"],
            "matmul_share_of_our_step": med["mlx-openelm matmuls alone"] / med["mlx-openelm step"],
            "bound_on_ratio": med["mlx-lm step"] / med["mlx-openelm matmuls alone"],
        }
        b = record["batches"][str(batch)]
        print(f"batch {batch}: ours {med['mlx-openelm step']:.1f} ms (matmuls alone "
              f"{med['mlx-openelm matmuls alone']:.1f}, {100 * b['matmul_share_of_our_step']:.0f}%), mlx-lm "
              f"{med['mlx-lm step']:.1f} ms; ratio {b['step_ratio']:.2f}, bound {b['bound_on_ratio']:.2f}", flush=True)
    print(f"wrote {write_json(RESULTS / 'batch_step.json', record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
