"""Benchmark generation: a warm-up, timed trials and medians, model bytes, and the bandwidth roofline.

Every figure is measured: bytes from the arrays' ``nbytes``, times around the project's public
``generate_step`` (greedy, random prompt ids, each token read back as a user would), peak memory from MLX.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import __version__
from .cache import make_cache
from .config import ModelArgs, preset
from .decode import DecodeFallbackWarning, describe
from .device import device_info, memory_bandwidth
from .fileio import atomic_write
from .generate import generate_step
from .hub import resolve_model
from .load import auto_dtype, load_model
from .random_weights import random_model
from .runner import generation_stream
from .speculative import SpeculativeStats

# progress(description, done, total): called between tokens, never inside a timed MLX evaluation.
Progress = Callable[[str, int, int], None]
StepFn = Callable[..., Iterator[tuple[Any, Any]]]
Q_BITS = (2, 3, 4, 5, 6, 8)
SWEEP_PRECISIONS: tuple[int | None, ...] = (None, 8, 4)  # bits; None = the unquantized dtype
_PROGRESS_EVERY = 16


@dataclass(frozen=True)
class Trial:
    """One timed generation. ``ttft_s``: prompt processing + first token; ``generation_tps`` over the rest."""

    prompt_tps: float
    generation_tps: float
    ttft_s: float
    total_s: float
    peak_memory_bytes: int
    tokens: list[int] = field(repr=False)
    acceptance_rate: float | None = None  # speculative decoding: kept / proposed draft tokens
    tokens_per_pass: float | None = None  # speculative decoding: tokens per target pass


@dataclass
class BenchResult:
    """A benchmark's settings, trials, medians, byte counts, device and roofline; ``to_dict()`` is the JSON."""

    model: str
    dtype: str
    q_bits: int | None
    q_group_size: int | None
    prompt_tokens: int
    gen_tokens: int
    warmup: Trial
    trials: list[Trial]
    parameters: int
    model_bytes: int
    kv_bytes_per_token: int
    bytes_per_token: int
    bandwidth_gbps: float
    bandwidth_source: str
    device: dict[str, Any]
    speculative: dict[str, Any] | None = None  # the draft (model label or prompt lookup) and tokens per draft
    # The decode path that ran: kernel set, attention (decode token / prompt chunk), and whether the step fell back
    # to the model's own forward pass (then the figures time that slower path), with the reason.
    decode: dict[str, Any] = field(default_factory=dict)

    def median(self, name: str) -> float:
        """Median of a :class:`Trial` field over the timed trials."""
        return statistics.median(getattr(t, name) for t in self.trials)

    @property
    def roofline_fraction(self) -> float:
        """Decode bytes/s reached (bytes read per token x median tokens/s) over the memory bandwidth."""
        return self.bytes_per_token * self.median("generation_tps") / (self.bandwidth_gbps * 1e9)

    def to_dict(self) -> dict[str, Any]:
        """Every field, per trial and as a median, plus the roofline fraction (JSON-ready)."""
        out = asdict(self)
        for t in [out["warmup"], *out["trials"]]:
            del t["tokens"]
        keys = ("prompt_tps", "generation_tps", "ttft_s", "total_s", "peak_memory_bytes")
        out["median"] = {k: self.median(k) for k in keys}
        if self.speculative:
            out["median"] |= {k: self.median(k) for k in ("acceptance_rate", "tokens_per_pass")}
        out["roofline_fraction"] = self.roofline_fraction
        out["generator"] = f"{generate_step.__module__}.{generate_step.__qualname__}"
        out["mlx_openelm_version"] = __version__
        out["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return out


def check_counts(prompt_tokens: int, gen_tokens: int, trials: int) -> None:
    """Reject counts a benchmark cannot use (generation speed needs at least two generated tokens)."""
    if prompt_tokens < 1:
        raise ValueError(f"--prompt-tokens must be >= 1, got {prompt_tokens}")
    if gen_tokens < 2:
        raise ValueError(f"--gen-tokens must be >= 2 (speed is measured after the first token), got {gen_tokens}")
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")


def time_generation(
    model: nn.Module, prompt: mx.array, gen_tokens: int, step: StepFn | None = None, progress: Progress | None = None,
    label: str = "", stream: Any = None, speculative: dict[str, Any] | None = None,
) -> Trial:
    """Generate ``gen_tokens`` greedily after ``prompt`` through ``step`` (default: the project's generate_step).

    ``stream``: the generator's stream (default: the project's), synchronized after the timing so that work a
    generator queued ahead neither counts nor overlaps the next measurement. ``speculative``: the project's
    ``draft_model`` / ``prompt_lookup`` / ``num_draft_tokens`` options (acceptance is then recorded).
    """
    stats = None
    if speculative:
        stats = SpeculativeStats()
        step = functools.partial(generate_step, stats=stats, **speculative)
    step, stream = step or generate_step, stream or generation_stream()
    mx.synchronize(stream)
    mx.synchronize()
    mx.reset_peak_memory()
    tokens: list[int] = []
    tic = time.perf_counter()
    first = tic
    for tok, _ in step(prompt, model, max_tokens=gen_tokens):
        tokens.append(tok if isinstance(tok, int) else tok.item())
        if len(tokens) == 1:
            first = time.perf_counter()
        if progress and len(tokens) % _PROGRESS_EVERY == 0:
            progress(label, len(tokens), gen_tokens)
    end = time.perf_counter()
    mx.synchronize(stream)
    ttft = first - tic
    return Trial(
        prompt_tps=prompt.size / ttft,
        generation_tps=(len(tokens) - 1) / (end - first),
        ttft_s=ttft,
        total_s=end - tic,
        peak_memory_bytes=mx.get_peak_memory(),
        tokens=tokens,
        acceptance_rate=stats and stats.acceptance_rate,
        tokens_per_pass=stats and stats.tokens_per_pass,
    )


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters (quantized weights, scales and biases included), from the arrays themselves."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def parameter_count(args: ModelArgs) -> int:
    """Parameters of a model with ``args`` (tied embeddings counted once), computed without building it."""
    d, hd = args.model_dim, args.head_dim
    n = args.vocab_size * d + d
    for q, kv, ffn in zip(args.num_query_heads, args.num_kv_heads, args.ffn_dims):
        n += (q + 2 * kv) * hd * d + q * hd * d + 3 * ffn * d + 2 * d + 2 * hd
    return n


def kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes the KV cache holds per token position, measured from the cache's buffers (allocated ahead in blocks,
    so their bytes are divided by the capacity)."""
    cache = make_cache(model)
    cache.reserve(1)
    return cache.nbytes // cache.capacity


def decode_bytes_per_token(model: nn.Module, context: int) -> int:
    """Bytes one decode step reads at ``context`` cached tokens.

    All parameters (the embedding table once: it is the tied output head), plus the input embedding row
    the lookup reads, plus the KV cache.
    """
    emb = model.transformer.token_embeddings
    row = sum(v.nbytes for _, v in tree_flatten(emb.parameters())) // model.args.vocab_size
    return model_bytes(model) + row + kv_bytes_per_token(model) * context


def prepare_model(
    size: str | ModelArgs = "OpenELM-270M",
    model_dir: str | Path | None = None,
    dtype: str | None = None,
    q_bits: int | None = None,
    q_group_size: int = 64,
    seed: int = 0,
) -> tuple[nn.Module, str]:
    """``(model, label)``: the converted ``model_dir`` (or a repo id, converted on first use) if given, else
    random weights of ``size`` (a preset name or ``ModelArgs``; bfloat16 unless ``dtype``), quantized in memory
    when ``q_bits`` is given.

    Without ``dtype`` the compute dtype is the project's default for loading (``"auto"``: on the CPU backend,
    quantized models compute in float32).
    """
    if q_bits is not None and q_bits not in Q_BITS:
        raise ValueError(f"--q-bits must be one of {', '.join(map(str, Q_BITS))}, got {q_bits}")
    if model_dir is not None:
        folder = resolve_model(model_dir)  # a repo id is converted once into the model cache
        if not folder.is_dir():
            raise FileNotFoundError(f"--model {model_dir} is neither a folder nor a repo id (apple/OpenELM-270M)")
        model, label = load_model(folder, dtype=dtype or "auto"), folder.name
        if q_bits is not None and any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise ValueError(f"{model_dir} is already quantized: drop --q-bits or benchmark an unquantized folder")
    else:
        args = size if isinstance(size, ModelArgs) else preset(size)
        label = f"{args.num_transformer_layers}L-{args.model_dim}d" if isinstance(size, ModelArgs) else size
        model = random_model(args, dtype=dtype or "bfloat16", seed=seed)
    if q_bits is not None:
        nn.quantize(model, group_size=q_group_size, bits=q_bits)
        if dtype is None and (fast := auto_dtype(model)) is not None:
            model.set_dtype(fast)  # what loading a quantized folder does by default (dtype="auto")
        mx.eval(model.parameters())
    return model, label


def _dtype_name(model: nn.Module) -> str:
    return str(model.transformer.norm.weight.dtype).removeprefix("mlx.core.")


def bench(
    model: nn.Module,
    label: str = "model",
    *,
    prompt_tokens: int = 128,
    gen_tokens: int = 128,
    trials: int = 3,
    seed: int = 0,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    step: StepFn | None = None,
    progress: Progress | None = None,
    device: dict[str, Any] | None = None,
    bandwidth: tuple[float, str] | None = None,
    probe_bytes: int = 256 * 2**20,
    speculative: dict[str, Any] | None = None,
    draft_label: str | None = None,
) -> BenchResult:
    """Warm up once (identical shapes, discarded), then time ``trials`` greedy generations of one random prompt.

    ``device`` / ``bandwidth`` (GB/s, source) are measured when not given (the bandwidth before and after the
    trials, by a probe over ``probe_bytes`` unless the chip's figure is published). ``speculative`` as for
    :func:`time_generation`, its draft named ``draft_label`` in the result.
    """
    check_counts(prompt_tokens, gen_tokens, trials)
    if prompt_tokens + gen_tokens > model.args.max_context_length:
        raise ValueError(f"--prompt-tokens + --gen-tokens is {prompt_tokens + gen_tokens}, more than the model's "
                         f"context of {model.args.max_context_length} tokens: lower them")
    device = device or device_info()
    prompt = mx.random.randint(0, model.args.vocab_size, (prompt_tokens,), key=mx.random.key(seed))

    def measured_bandwidth() -> tuple[float, str]:
        if bandwidth is not None:
            return bandwidth
        if progress:
            progress("measuring memory bandwidth", 0, 1)
        return memory_bandwidth(device, probe_bytes)

    before = measured_bandwidth()
    with warnings.catch_warnings(record=True) as caught:  # a decode step that falls back says so here
        warnings.simplefilter("always", DecodeFallbackWarning)
        warmup = time_generation(model, prompt, gen_tokens, step, progress, "warm-up", speculative=speculative)
        runs = [
            time_generation(model, prompt, gen_tokens, step, progress, f"trial {i + 1}/{trials}",
                            speculative=speculative)
            for i in range(trials)
        ]
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, DecodeFallbackWarning)]
    for w in caught:
        if not issubclass(w.category, DecodeFallbackWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    kv = kv_bytes_per_token(model)
    # Measured before and after the trials, the higher kept: other load on the machine only lowers a reading.
    gbps, source = max(before, measured_bandwidth())
    return BenchResult(
        model=label, dtype=_dtype_name(model), q_bits=q_bits, q_group_size=q_group_size if q_bits else None,
        prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, warmup=warmup, trials=runs,
        parameters=parameter_count(model.args), model_bytes=model_bytes(model), kv_bytes_per_token=kv,
        bytes_per_token=decode_bytes_per_token(model, prompt_tokens + gen_tokens // 2),
        bandwidth_gbps=gbps, bandwidth_source=source, device=device,
        speculative=speculative and {"draft": draft_label or (
            f"prompt lookup {speculative['prompt_lookup']}" if speculative.get("prompt_lookup") else "draft model"),
            "num_draft_tokens": speculative.get("num_draft_tokens", 3)},
        decode={**describe(), "fallback": bool(fallbacks), "fallback_reason": fallbacks[0] if fallbacks else None},
    )


def result_table(result: BenchResult) -> tuple[list[str], list[list[str]]]:
    """``(headers, rows)``: one row per trial and a median row, for a terminal table; the last column names the
    kernel set that ran, flagged when the step fell back to the model's own forward pass."""
    headers = ["trial", "prompt tok/s", "gen tok/s", "TTFT (s)", "peak mem (GB)", "kernels"]
    kernels = f"{result.decode.get('kernels', '?')}{' FALLBACK' if result.decode.get('fallback') else ''}"
    rows = [
        [name, f"{t.prompt_tps:.2f}", f"{t.generation_tps:.2f}", f"{t.ttft_s:.3f}", f"{t.peak_memory_bytes / 1e9:.3f}",
         kernels]
        for name, t in [("warm-up", result.warmup), *((str(i + 1), t) for i, t in enumerate(result.trials))]
    ]
    m = result.median
    rows.append(["median", f"{m('prompt_tps'):.2f}", f"{m('generation_tps'):.2f}", f"{m('ttft_s'):.3f}",
                 f"{m('peak_memory_bytes') / 1e9:.3f}", kernels])
    return headers, rows


def summary_lines(result: BenchResult) -> list[str]:
    """Model, device, byte counts and roofline as short lines."""
    d = result.device
    precision = f"{result.q_bits}-bit weights, group {result.q_group_size}; " if result.q_bits else ""
    chip = device_label(d)
    cores = f", {d['gpu_cores']} GPU cores" if d.get("gpu_cores") else \
        "" if d.get("backend") == "cuda" else f", {d.get('cpu_count')} CPUs"
    return [
        f"model: {result.model} ({precision}{result.dtype} compute), {result.parameters / 1e6:.1f}M parameters, "
        f"{result.model_bytes / 1e9:.3f} GB; {result.prompt_tokens} prompt + {result.gen_tokens} generated tokens",
        f"device: {chip}{cores}; MLX {d['mlx_version']} ({d['backend']} backend)",
        f"decode reads {result.bytes_per_token / 1e9:.3f} GB/token (weights + KV at the midpoint); "
        f"bandwidth {result.bandwidth_gbps:.1f} GB/s ({result.bandwidth_source}); "
        f"roofline reached: {100 * result.roofline_fraction:.1f}%",
        f"decode path: {decode_path(result.decode)}",
    ] + ([f"speculative decoding ({result.speculative['draft']}, {result.speculative['num_draft_tokens']} draft "
          f"tokens): acceptance {100 * result.median('acceptance_rate'):.1f}%, "
          f"{result.median('tokens_per_pass'):.2f} tokens per target pass"] if result.speculative else [])


def device_label(d: dict[str, Any]) -> str | None:
    """What ran the numbers, from a result's device record (``label``; records written before it existed: the chip
    or CPU model)."""
    return d.get("label") or d.get("chip") or d.get("cpu_model") or d.get("device_name")


def decode_path(decode: dict[str, Any]) -> str:
    """``"cpu kernels, mask attention"``, with ``"FALLBACK ..."`` when the step fell back to the model's forward."""
    if not decode:
        return "not recorded"
    attention = decode.get("attention", {})
    text = f"{decode.get('kernels')} kernels, attention {attention.get('decode')} (decode) / " \
           f"{attention.get('prefill')} (prefill)"
    if decode.get("fallback"):
        text += f"; FALLBACK to the model's own forward pass, these figures time it ({decode.get('fallback_reason')})"
    return text


def check_output(path: str | Path) -> Path:
    """Fail before a long run if ``path`` cannot be written (missing folder, a directory, no permission)."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise ValueError(f"{path} is a directory: give a file path")
    if not parent.is_dir():
        raise FileNotFoundError(f"folder {parent} does not exist: create it or choose another output path")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write to folder {parent}: choose another output path")
    return path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` atomically to an output path the user gave (checked first, one clear error if unusable)."""
    return atomic_write(check_output(path), data)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    return write_atomic(path, json.dumps(data, indent=2) + "\n")
