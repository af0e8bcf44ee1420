"""Read and write converted MLX model directories (``config.json`` + ``model*.safetensors``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import load_model as _mlx_lm_load_model
from mlx_lm.utils import save_model as _mlx_lm_save_model

from .config import ModelArgs, preset
from .fileio import cache_dir, is_repo_id
from .model import Model

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def parse_dtype(name: str | mx.Dtype) -> mx.Dtype:
    """``"bfloat16"`` -> ``mx.bfloat16``; an ``mx.Dtype`` passes through."""
    if isinstance(name, mx.Dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def auto_dtype(model: Model) -> mx.Dtype | None:
    """The compute dtype ``dtype="auto"`` picks for ``model`` on the default device (None: keep the stored one).

    Measured on MLX's CPU backend (``benchmarks/overhead.py --dtype-table``): a 270M decode step takes 100 ms in
    bfloat16, 143 ms in float32, 204 ms in float16; 4-bit, 73 ms with float32 scales and activations against
    534 ms with bfloat16 and 2608 ms with float16 ones. So on the CPU quantized and float16 models compute in
    float32 (packed weights stay packed; float16 -> float32 loses nothing) and bfloat16 ones stay bfloat16.
    Metal and CUDA keep the stored half precision.
    """
    if mx.default_device().type != mx.cpu:
        return None
    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    return mx.float32 if quantized or model.transformer.norm.weight.dtype == mx.float16 else None


def load_model(path: str | Path, dtype: str | mx.Dtype | None = None, lazy: bool = False) -> Model:
    """Load a converted directory; quantized layers are rebuilt from its ``quantization`` record.

    ``dtype`` casts the floating-point parameters (quantization scales included; packed weights stay packed);
    ``"auto"`` picks the fastest for this backend (:func:`auto_dtype`); None keeps the stored dtype.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: point to a converted model directory")
    if not list(path.glob("model*.safetensors")):
        raise FileNotFoundError(f"{path} has no model*.safetensors: convert a checkpoint first (mlx-openelm convert)")
    # mlx-lm's loader already does the quantized rebuild (per-layer overrides included) and strict loading.
    model, _ = _mlx_lm_load_model(path, lazy=True, get_model_classes=lambda config: (Model, ModelArgs))
    if isinstance(dtype, str) and dtype == "auto":
        dtype = auto_dtype(model)
    if dtype is not None:
        model.set_dtype(parse_dtype(dtype))
    if not lazy:
        mx.eval(model.parameters())
    return model


def load(path: str | Path, dtype: str | mx.Dtype | None = "auto", chat_template: str | Path | None = None):
    """``model, tokenizer = load(path)`` for a converted model directory, or a Hugging Face repo id (converted on
    first use, see :func:`resolve_model`); ``dtype`` as for :func:`load_model`."""
    from .tokenizer import load_tokenizer

    path = resolve_model(path)
    model = load_model(path, dtype=dtype)
    return model, load_tokenizer(path, chat_template=chat_template)


def resolve_model(name: str | Path) -> Path:
    """A converted model folder for ``name``: a local path as is, or for a Hugging Face repo id
    (``apple/OpenELM-270M-Instruct``) its conversion in the user cache (:func:`~mlx_openelm.fileio.cache_dir`),
    made on first use."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists() or not is_repo_id(text):
        return path
    target = cache_dir() / "models" / text.replace("/", "--")
    if not (target / "config.json").is_file():
        from .convert import convert

        convert(text, target, force=target.exists())
    return target


def random_model(
    name: str = "OpenELM-270M",
    dtype: str | mx.Dtype = mx.bfloat16,
    seed: int = 0,
    **overrides: Any,
) -> Model:
    """A model with random weights from a preset (``overrides`` replace config fields), for tests and benchmarks."""
    args = name if isinstance(name, ModelArgs) else preset(name, **overrides)
    mx.random.seed(seed)
    model = Model(args)
    # Embedding std 4/sqrt(dim): tied logits then spread by about 4, like a trained model's (peaked, not flat).
    emb = model.transformer.token_embeddings
    emb.weight = mx.random.normal(emb.weight.shape) * (4 / args.model_dim**0.5)
    model.set_dtype(parse_dtype(dtype))
    mx.eval(model.parameters())
    return model


def refuse_existing(target: Path, force: bool = False) -> None:
    """Raise ``FileExistsError`` when ``target`` exists and ``force`` is not set."""
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists: choose another output or pass --force to replace it")


def atomic_directory(target: Path, force: bool = False) -> Path:
    """A fresh temporary directory beside ``target``; move it into place with :func:`commit_directory`."""
    refuse_existing(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))


def commit_directory(tmp: Path, target: Path) -> None:
    """Replace ``target`` by ``tmp`` (the old output is removed only once the new one is complete)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


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
