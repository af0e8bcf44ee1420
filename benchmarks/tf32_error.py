"""How far TF32 moves float32 logits here, reported apart from the float32 tests (which run with MLX_ENABLE_TF32=0).

MLX computes float32 matmuls with more than one row in TF32 on CUDA (and on M5-class GPUs with recent macOS) unless
``MLX_ENABLE_TF32=0``. This runs a tiny float32 OpenELM (the tests' shape: uneven per-layer heads) on the default
device once with TF32 as MLX defaults it and once with ``MLX_ENABLE_TF32=0`` (each in its own process: MLX reads the
flag once), each against the same model on the CPU stream, whose float32 matmuls are exact; and, on any machine, the
estimate from rounding only the weights to TF32's 10-bit mantissa. The tests' float32 bound is 1e-4.

    python benchmarks/tf32_error.py [--json benchmarks/results/cuda-tf32.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map

from mlx_openelm import ModelArgs, random_model
from mlx_openelm.bench import write_json
from mlx_openelm.device import device_info

TINY = {"model_type": "openelm", "num_transformer_layers": 3, "model_dim": 64, "head_dim": 16,
        "num_query_heads": [4, 6, 8], "num_kv_heads": [1, 2, 2], "ffn_multipliers": [0.5, 2.0, 4.0],
        "ffn_dim_divisor": 32, "vocab_size": 128, "max_context_length": 512}
BOUND = 1e-4  # the float32 bound of tests/test_model.py, test_decode.py, test_chat.py, test_speculative.py


def round_tf32(x: mx.array) -> mx.array:
    """``x`` (float32) rounded to TF32: 10 mantissa bits, to nearest."""
    if x.dtype != mx.float32:
        return x
    return ((x.view(mx.uint32) + 0x1000) & 0xFFFFE000).view(mx.float32)


def _model_and_tokens() -> tuple:
    model = random_model(ModelArgs.from_dict(TINY), dtype="float32", seed=0)
    tokens = mx.random.randint(0, TINY["vocab_size"], (2, 16), key=mx.random.key(0))
    return model, tokens


def _reference(model, tokens: mx.array) -> mx.array:
    with mx.stream(mx.cpu):
        out = model(tokens)
        mx.eval(out)
    return out


def measure() -> float:
    """Max |logit difference| of the default device's float32 forward pass against the CPU stream's."""
    model, tokens = _model_and_tokens()
    ref = _reference(model, tokens)
    out = model(tokens)
    return mx.abs(out - ref).max().item()


def estimate() -> float:
    """Max |logit difference| from rounding only the weights to TF32 (computed on the CPU stream)."""
    model, tokens = _model_and_tokens()
    ref = _reference(model, tokens)
    model.update(tree_map(round_tf32, model.parameters()))
    return mx.abs(_reference(model, tokens) - ref).max().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the record here")
    p.add_argument("--measure", action="store_true", help="(internal) print this process's error and exit")
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps({"max_abs": measure()}))
        return 0
    runs = {}
    for flag in ("1", "0"):
        env = {**os.environ, "MLX_ENABLE_TF32": flag}
        out = subprocess.run([sys.executable, __file__, "--measure"], env=env, capture_output=True, text=True,
                             check=True).stdout
        runs[flag] = json.loads(out.strip().splitlines()[-1])["max_abs"]
    record = {"tf32_on_max_abs": runs["1"], "tf32_off_max_abs": runs["0"], "weights_rounded_estimate": estimate(),
              "bound": BOUND, "bound_holds_with_tf32_off": runs["0"] <= BOUND, "device": device_info()}
    print(f"float32 logits vs the CPU stream: max |difference| {runs['1']:.3g} with TF32 (MLX's default), "
          f"{runs['0']:.3g} with MLX_ENABLE_TF32=0 (bound {BOUND:g}); weights rounded to TF32 alone: "
          f"{record['weights_rounded_estimate']:.3g}")
    if args.json:
        write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
