"""Read and write converted MLX model directories (``config.json`` + ``model*.safetensors``).

A folder is checked before anything is loaded: its ``config.json`` must parse and describe an OpenELM, and every
weights file's header must fit the file (a truncated or corrupt file is named here, not at evaluation).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.utils import load_model as _mlx_lm_load_model
from mlx_lm.utils import save_model as _mlx_lm_save_model

from . import backend
from .config import ModelArgs
from .dtypes import parse_dtype
from .fileio import atomic_directory, commit_directory
from .model import Model
from .tensorfile import read_safetensors_header


def auto_dtype(model: Model) -> mx.Dtype | None:
    """The compute dtype ``dtype="auto"`` picks for ``model`` on the default device (None: keep the stored one).

    Measured on MLX's CPU backend (``benchmarks/overhead.py --dtype-table``): a 270M decode step takes 100 ms in
    bfloat16, 143 ms in float32, 204 ms in float16; 4-bit, 73 ms with float32 scales and activations against
    534 ms with bfloat16 and 2608 ms with float16 ones. So on the CPU quantized and float16 models compute in
    float32 (packed weights stay packed; float16 -> float32 loses nothing) and bfloat16 ones stay bfloat16.
    Metal and CUDA keep the stored half precision (:func:`mlx_openelm.backend.compute_dtype` decides).
    """
    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    return backend.compute_dtype(quantized, model.transformer.norm.weight.dtype)


def read_config(path: str | Path) -> ModelArgs:
    """The ``ModelArgs`` of a converted folder (or checkpoint), every problem named with the file and the fix."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: point to a converted model directory")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}): convert the model again") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} is not a JSON object: convert the model again")
    try:
        return ModelArgs.from_dict(config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{file}: {e}") from None


def check_folder(path: str | Path) -> ModelArgs:
    """Check a converted folder without loading it: its config and every weights file's header."""
    path = Path(path)
    args = read_config(path)
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no model*.safetensors: convert a checkpoint first (mlx-openelm convert)")
    for file in files:
        read_safetensors_header(file)
    return args


def apply_adapter(model: Model, adapter_path: str | Path) -> Model:
    """Apply a LoRA/DoRA adapter trained by ``mlx_lm.lora`` and fuse it into the weights (as ``mlx_lm.fuse``
    does), so the fused model runs through the compiled decode step like any other."""
    from mlx_lm.tuner.utils import load_adapters

    adapter_path = Path(adapter_path)
    if not (adapter_path / "adapter_config.json").is_file() or not (adapter_path / "adapters.safetensors").is_file():
        raise FileNotFoundError(f"--adapter-path {adapter_path}: expected adapter_config.json and adapters.safetensors "
                                "(written by mlx_lm.lora)")
    try:
        load_adapters(model, str(adapter_path))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{adapter_path}/adapter_config.json is not an mlx_lm adapter config ({e!r})") from None
    fused = [(name, m.fuse()) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


def load_model(path: str | Path, dtype: str | mx.Dtype | None = None, lazy: bool = False,
               adapter_path: str | Path | None = None) -> Model:
    """Load a converted directory; quantized layers are rebuilt from its ``quantization`` record.

    ``dtype`` casts the floating-point parameters (quantization scales included; packed weights stay packed);
    ``"auto"`` picks the fastest for this backend (:func:`auto_dtype`); None keeps the stored dtype.
    ``adapter_path``: an ``mlx_lm.lora`` adapter to apply and fuse (:func:`apply_adapter`).
    """
    path = Path(path)
    check_folder(path)
    # mlx-lm's loader already does the quantized rebuild (per-layer overrides included) and strict loading.
    model, _ = _mlx_lm_load_model(path, lazy=True, get_model_classes=lambda config: (Model, ModelArgs))
    if adapter_path is not None:
        apply_adapter(model, adapter_path)
    if isinstance(dtype, str) and dtype == "auto":
        dtype = auto_dtype(model)
    if dtype is not None:
        model.set_dtype(parse_dtype(dtype))
    if not lazy:
        mx.eval(model.parameters())
    return model


def save(model: Model, path: str | Path, config: dict[str, Any] | None = None, force: bool = False) -> Path:
    """Write ``model`` as a converted directory, atomically: ``config.json`` (+ ``config`` extras) and weights."""
    target = Path(path)
    tmp = atomic_directory(target, force)
    try:
        _mlx_lm_save_model(tmp, model)
        record = {**model.args.to_dict(), **(config or {})}
        (tmp / "config.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        commit_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
