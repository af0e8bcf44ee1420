"""Models with random weights from a published size, for tests and benchmarks (nothing is downloaded)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .config import ModelArgs, preset
from .dtypes import parse_dtype
from .model import Model


def random_model(
    name: str | ModelArgs = "OpenELM-270M",
    dtype: str | mx.Dtype = mx.bfloat16,
    seed: int = 0,
    **overrides: Any,
) -> Model:
    """A model with random weights from a preset (``overrides`` replace config fields) or from ``ModelArgs``."""
    args = name if isinstance(name, ModelArgs) else preset(name, **overrides)
    mx.random.seed(seed)
    model = Model(args)
    # Embedding std 4/sqrt(dim): tied logits then spread by about 4, like a trained model's (peaked, not flat).
    emb = model.transformer.token_embeddings
    emb.weight = mx.random.normal(emb.weight.shape) * (4 / args.model_dim**0.5)
    model.set_dtype(parse_dtype(dtype))
    mx.eval(model.parameters())
    return model
