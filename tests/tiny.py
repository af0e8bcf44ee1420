"""Tiny OpenELM configurations with every architectural feature (uneven per-layer heads and FFN widths)."""

from __future__ import annotations

from mlx_openelm import ModelArgs

TINY_CONFIG = {
    "model_type": "openelm",
    "num_transformer_layers": 3,
    "model_dim": 64,
    "head_dim": 16,
    "num_query_heads": [4, 6, 8],
    "num_kv_heads": [1, 2, 2],
    "ffn_multipliers": [0.5, 2.0, 4.0],
    "ffn_dim_divisor": 32,
    "vocab_size": 128,
    "max_context_length": 512,
}


def tiny_args(**overrides) -> ModelArgs:
    """The tiny config as ``ModelArgs`` (``overrides`` replace fields)."""
    return ModelArgs.from_dict({**TINY_CONFIG, **overrides})
