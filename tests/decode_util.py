"""The decode step against the model's own forward pass, on tiny models of any head size, dtype and batch."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from tiny import tiny_args

from mlx_openelm import backend, make_cache, random_model
from mlx_openelm.decode import DecodeStep

# The float32 logit bound: 1e-4 wherever float32 matmuls are exact (the CPU; a GPU with MLX_ENABLE_TF32=0, as
# benchmarks/gpu_suite.py runs the tests). With TF32 (MLX's default on CUDA) products keep 10 mantissa bits: rounding
# only the tiny models' weights moves their logits by ~7e-3 (benchmarks/tf32_error.py measures the device's figure).
FLOAT32 = 5e-2 if backend.tf32() else 1e-4

# Prefill in two chunks (the second attending to the first), then single steps across the cache's growth from
# 256 to 512 positions, then one verify pass of several tokens.
CHUNKS = ((0, 100), (100, 250))
STEPS = range(250, 262)
VERIFY = 4


def model_for(head_dim: int, dtype: str, base: float = 10000.0):
    """Two layers with GQA (2/4 query heads over 1/2 KV heads) at ``head_dim``; ``dtype`` float32, bfloat16 or
    ``"4-bit"`` (group 32, float32 scales, as ``dtype="auto"`` computes quantized models on the CPU)."""
    args = tiny_args(num_transformer_layers=2, head_dim=head_dim, num_query_heads=[2, 4], num_kv_heads=[1, 2],
                     ffn_multipliers=[0.5, 2.0], rope_freq_constant=base)
    model = random_model(args, dtype="float32" if dtype == "4-bit" else dtype, seed=head_dim)
    if dtype == "4-bit":
        nn.quantize(model, group_size=32, bits=4)
        mx.eval(model.parameters())
    return model


def ids(batch: int, length: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 128, (batch, length)), dtype=mx.uint32)


def _diff(a: mx.array, b: mx.array) -> tuple[float, bool]:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return mx.abs(a - b).max().item(), bool(mx.array_equal(mx.argmax(a, -1), mx.argmax(b, -1)).item())


def step_vs_model(model, batch: int, **step_kw) -> tuple[float, bool, DecodeStep]:
    """The worst logit difference between the step and the model over chunked prefill, single steps across
    capacity growth and a verify pass, and whether every argmax agreed."""
    tokens = ids(batch, STEPS[-1] + 1 + VERIFY, seed=batch)
    plain, fast = make_prompt_cache(model), make_cache(model)
    step = DecodeStep(model, **step_kw)
    worst, same = 0.0, True

    def check(a, b):
        nonlocal worst, same
        d, s = _diff(a, b)
        worst, same = max(worst, d), same and s

    for a, b in CHUNKS:
        check(model(tokens[:, a:b], cache=plain)[:, -1], step.prefill(fast, tokens[:, a:b]))
    for i in STEPS:
        check(model(tokens[:, i : i + 1], cache=plain)[:, -1], step(fast, tokens[:, i : i + 1]))
    end = STEPS[-1] + 1
    check(model(tokens[:, end : end + VERIFY], cache=plain), step.verify(fast, tokens[:, end : end + VERIFY]))
    assert fast.offset == plain[0].offset == end + VERIFY and fast.capacity == 512
    return worst, same, step
