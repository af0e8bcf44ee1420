"""Checkpoint conversion: Apple's OpenELM PyTorch safetensors -> MLX model directories.

``convert(source, output)`` validates every tensor against the model ``config.json`` describes, then streams
the checkpoint one tensor at a time (read, cast, optionally quantize, append to the current shard, free),
into a temporary directory beside ``output`` that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_openelm import __version__
from mlx_openelm.config import ModelArgs
from mlx_openelm.dtypes import DTYPES, parse_dtype
from mlx_openelm.fileio import atomic_directory, clean_stale, commit_directory, refuse_existing
from mlx_openelm.model import Model
from mlx_openelm.tokenizer_fetch import TokenizerUnavailable, ensure_tokenizer

from .quantize import RECIPES, QuantPlan, check_settings, plan_quantization, quantize_weight, quantized_specs
from .source import Checkpoint, open_checkpoint
from .writer import ShardWriter, TensorSpec

__all__ = ["RECIPES", "ConvertResult", "convert", "expected_tensors"]

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's shard size
# OpenELM-3B's activations overflow float16 (a peer's fp16 3B conversion produced only <unk>).
FLOAT16_MAX_MODEL_DIM = 2048


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion wrote."""

    path: Path
    source: str
    dtype: str
    quantization: dict | None
    unquantized: list[str]
    dropped: list[str]
    nbytes: int
    bits_per_weight: float
    tokenizer_note: str | None
    stale_removed: list[str]

    def summary(self) -> list[str]:
        """Lines for a user: what was written, what stayed unquantized or was dropped, the tokenizer note."""
        q = self.quantization
        kind = f"{self.dtype}, {q['bits']}-bit group {q['group_size']}" if q else self.dtype
        lines = [
            f"wrote {self.path} from {self.source} ({kind}, {self.nbytes / 1e9:.2f} GB, "
            f"{self.bits_per_weight:.2f} bits/weight)"
        ]
        if self.unquantized:
            lines.append(f"left unquantized (width not a multiple of the group size): {', '.join(self.unquantized)}")
        if self.dropped:
            lines.append(f"dropped rotary buffers: {', '.join(self.dropped)}")
        if self.tokenizer_note:
            lines.append(f"note: {self.tokenizer_note}")
        if self.stale_removed:
            lines.append(f"removed {len(self.stale_removed)} temporary folder(s) left by interrupted conversions: "
                         f"{', '.join(self.stale_removed)}")
        return lines


def expected_tensors(args: ModelArgs) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Tensor name -> shape of the model ``args`` describes, and quantizable module path -> input width.

    Building the model is free: MLX initialises parameters lazily and they are never evaluated here.
    """
    model = Model(args)
    shapes = {name: tuple(v.shape) for name, v in tree_flatten(model.parameters())}
    widths = {path: m.weight.shape[-1] for path, m in model.named_modules() if hasattr(m, "to_quantized")}
    return shapes, widths


def _check_tensors(ckpt: Checkpoint, shapes: dict[str, tuple[int, ...]]) -> None:
    problems = [f"missing tensor {n}" for n in shapes if n not in ckpt.tensors]
    problems += [f"unexpected tensor {n}" for n in ckpt.tensors if n not in shapes]
    problems += [
        f"tensor {n}: expected shape {shapes[n]}, got {info.shape}"
        for n, info in ckpt.tensors.items()
        if n in shapes and info.shape != shapes[n]
    ]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ValueError(f"{ckpt.label} does not match its config.json: {problems[0]}{more}")


def _output_specs(ckpt: Checkpoint, dtype: mx.Dtype, plan: QuantPlan | None) -> list[TensorSpec]:
    specs = []
    for name, info in ckpt.tensors.items():
        path = name.removesuffix(".weight")
        if plan is not None and path in plan.params:
            specs += quantized_specs(path, info.shape, plan.params[path], dtype)
        else:
            specs.append(TensorSpec(name, info.shape, dtype))
    return specs


def _add_tokenizer(directory: Path, ckpt: Checkpoint, tokenizer: str | Path | None, rebuild: bool, target: Path):
    instruct = Path(ckpt.label.rstrip("/")).name.endswith("-Instruct")
    try:
        ensure_tokenizer(
            directory,
            source_dir=ckpt.path,
            tokenizer=None if tokenizer is None else str(tokenizer),
            instruct=instruct,
            allow_rebuild=rebuild,
        )
    except TokenizerUnavailable as e:
        return f"no tokenizer was written ({e}); add one later with: mlx-openelm tokenizer fetch -o {target}"
    return None


def convert(
    source: str | Path,
    output: str | Path,
    *,
    dtype: str | mx.Dtype = "bfloat16",
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int = 64,
    q_recipe: str | None = None,
    tokenizer: str | Path | None = None,
    tokenizer_rebuild: bool = True,
    revision: str | None = None,
    force: bool = False,
    force_float16: bool = False,
    allow_bin: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> ConvertResult:
    """Convert an HF OpenELM checkpoint (local directory or hub repo id) into an MLX model directory.

    ``dtype`` is the type of the float tensors (bfloat16 by default; float16 is refused for models as wide as
    OpenELM-3B unless ``force_float16``). ``quantize`` (implied by ``q_bits`` or ``q_recipe``) stores linear
    and embedding weights with ``q_bits`` affine quantization in groups of ``q_group_size``, or with a mixed
    recipe from :data:`RECIPES`. The tokenizer files come from ``ensure_tokenizer`` (the source directory,
    else ``tokenizer``: a ``tokenizer.model``, a directory or a repo id, else Meta's file rebuilt from public
    packages if ``tokenizer_rebuild``); when none can be had, the result's ``tokenizer_note`` says how to add
    it. ``progress(done, total)`` is called with source bytes converted.
    ``allow_bin`` permits a ``pytorch_model.bin`` source, read with ``torch.load(weights_only=True)``.
    Nothing is left behind when a conversion fails; ``output`` is replaced only with ``force``.
    """
    out_dtype = parse_dtype(dtype)
    dtype_name = next(k for k, v in DTYPES.items() if v == out_dtype)
    quantize = quantize or q_bits is not None or q_recipe is not None
    if quantize:  # settings are checked before anything is read
        check_settings(q_bits, q_group_size, q_recipe)
    target = Path(output)
    refuse_existing(target, force)  # before anything is read
    ckpt = open_checkpoint(source, revision, allow_bin)
    try:
        args = ModelArgs.from_dict(ckpt.config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{ckpt.label}/config.json: {e}") from None
    if out_dtype == mx.float16 and args.model_dim > FLOAT16_MAX_MODEL_DIM and not force_float16:
        raise ValueError(
            f"float16 is refused for {ckpt.label} (model_dim {args.model_dim}, OpenELM-3B size): its activations "
            "overflow float16 and it generates only <unk>; use --dtype bfloat16 or pass --force-float16"
        )
    shapes, widths = expected_tensors(args)
    _check_tensors(ckpt, shapes)
    plan = plan_quantization(widths, args.num_transformer_layers, q_bits, q_group_size, q_recipe) if quantize else None
    specs = _output_specs(ckpt, out_dtype, plan)
    total = sum(info.nbytes for info in ckpt.tensors.values())

    stale = clean_stale(target)
    tmp = atomic_directory(target, force)
    writer = ShardWriter(tmp, specs, max_shard_bytes)
    try:
        done = 0
        for name, info in list(ckpt.tensors.items()):
            weight = ckpt.load(name).astype(out_dtype)
            path = name.removesuffix(".weight")
            if plan is not None and path in plan.params:
                for out_name, array in quantize_weight(path, weight, plan.params[path]):
                    writer.write(out_name, array)
            else:
                writer.write(name, weight)
            del weight  # free this tensor before reading the next
            done += info.nbytes
            if progress is not None:
                progress(done, total)
        writer.close()
        note = _add_tokenizer(tmp, ckpt, tokenizer, tokenizer_rebuild, target)
        config = {k: v for k, v in ckpt.config.items() if k != "_name_or_path"}
        config.update(torch_dtype=dtype_name, mlx_openelm_version=__version__, converted_from=ckpt.label)
        if plan is not None:
            config["quantization"] = config["quantization_config"] = plan.record()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        commit_directory(tmp, target)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    nbytes = sum(s.nbytes for s in specs)
    return ConvertResult(
        path=target,
        source=ckpt.label,
        dtype=dtype_name,
        quantization=plan.record() if plan else None,
        unquantized=plan.skipped if plan else [],
        dropped=ckpt.dropped,
        nbytes=nbytes,
        bits_per_weight=8 * nbytes / sum(math.prod(info.shape) for info in ckpt.tensors.values()),
        tokenizer_note=note,
        stale_removed=[p.name for p in stale],
    )
