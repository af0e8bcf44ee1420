"""Write an OpenELM checkpoint as Apple publishes it on Hugging Face: HF tensor names, float32 safetensors
(one file, or shards with ``model.safetensors.index.json``) and a ``config.json`` like Apple's.

Written with the ``safetensors`` package, independently of the converter's own writer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

# The keys of Apple's OpenELM config.json besides the per-model shape (apple/OpenELM-270M, transformers 4.39).
APPLE_CONFIG = {
    "activation_fn_name": "swish",
    "architectures": ["OpenELMForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_openelm.OpenELMConfig",
        "AutoModelForCausalLM": "modeling_openelm.OpenELMForCausalLM",
    },
    "bos_token_id": 1,
    "eos_token_id": 2,
    "ffn_dim_divisor": 256,
    "ffn_with_glu": True,
    "initializer_range": 0.02,
    "max_context_length": 2048,
    "model_type": "openelm",
    "normalization_layer_name": "rms_norm",
    "normalize_qk_projections": True,
    "num_gqa_groups": 4,
    "qkv_multipliers": [0.5, 1.0],
    "rope_freq_constant": 10000,
    "rope_max_length": 4096,
    "share_input_output_layers": True,
    "torch_dtype": "float32",
    "transformers_version": "4.39.3",
    "use_cache": True,
    "vocab_size": 32000,
}


def apple_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Apple's ``config.json`` keys, with the model's own fields (``ModelArgs.to_dict()`` or a dict) on top."""
    return {**APPLE_CONFIG, **config_dict}


def hf_weights(model_or_weights: Any) -> dict[str, np.ndarray]:
    """HF-named float32 NumPy arrays from an MLX model or a ``{name: array}`` mapping (MLX or NumPy)."""
    if isinstance(model_or_weights, nn.Module):  # a Module is also a dict: test it first
        model_or_weights = dict(tree_flatten(model_or_weights.parameters()))
    return {
        k: np.array(v.astype(mx.float32)) if isinstance(v, mx.array) else np.asarray(v, np.float32)
        for k, v in model_or_weights.items()
    }


def write_hf_checkpoint(
    model_or_weights: Any, config_dict: dict[str, Any], out_dir: str | Path, shards: int = 1
) -> Path:
    """Write ``out_dir`` as an HF OpenELM checkpoint; ``shards > 1`` splits the tensors, as Apple's 3B repos do."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = hf_weights(model_or_weights)
    (out / "config.json").write_text(json.dumps(apple_config(config_dict), indent=2) + "\n")
    if shards == 1:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    names = list(weights)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[j]: weights[names[j]] for j in part}, str(out / file), metadata={"format": "pt"})
        weight_map.update({names[j]: file for j in part})
    index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
