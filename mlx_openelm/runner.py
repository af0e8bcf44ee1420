"""What every generation loop runs in: its stream, the token budget, the wired-memory limit, and the model over its
cache (:class:`Forward`). Shared by plain (``generate.py``) and speculative (``speculative.py``) decoding.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import backend
from .cache import KVCache, cached_tokens, make_cache
from .decode import DecodeStep
from .model import Model

_STREAMS: dict[str, Any] = {}


def generation_stream() -> Any:
    """A stream just for generation on the default device, so its work queues behind nothing else (one per device
    and thread, made on first use: importing the library creates no MLX state). Reusing it matters: compiled
    functions are traced per stream."""
    device = mx.default_device()
    key = str(device)  # mx.Device hashes by identity, and default_device() returns a new object each call
    if key not in _STREAMS:
        _STREAMS[key] = mx.new_thread_local_stream(device)
    return _STREAMS[key]


def token_budget(model: nn.Module, prompt_tokens: int, max_tokens: int, cache: KVCache | list | None = None,
                 max_kv_size: int | None = None) -> int:
    """How many tokens may be generated: ``max_tokens``, capped by the context limit (``max_context_length``)
    unless the cache rotates.

    Raises ``ValueError`` when the prompt (after what ``cache`` already holds) leaves no room.
    """
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if prompt_tokens < 1:
        raise ValueError("the prompt is empty: give at least one token")
    held = 0 if cache is None else cached_tokens(cache)
    limit = getattr(model.args, "max_context_length", None)  # mlx-lm's model class does not record it
    if limit is None:
        return max_tokens
    if held + prompt_tokens >= limit:
        where = f" after {held} cached tokens" if held else ""
        raise ValueError(f"the prompt has {prompt_tokens} tokens{where} but the model's context holds {limit}: "
                         "shorten the prompt")
    rotating = max_kv_size is not None or (isinstance(cache, list) and hasattr(cache[0], "max_size"))
    return max_tokens if rotating else min(max_tokens, limit - held - prompt_tokens)


@contextlib.contextmanager
def wired_limit(model: nn.Module, cache_bytes: int = 0, stream: Any = None) -> Iterator[None]:
    """On Metal, keep the weights wired while generating, and warn when model + cache near the working set.

    A no-op on other backends (CPU, CUDA): :func:`mlx_openelm.backend.wired_limit_bytes` decides.
    """
    limit = backend.wired_limit_bytes()
    if not limit:
        yield
        return
    need = sum(v.nbytes for _, v in tree_flatten(model.parameters())) + cache_bytes
    if need > 0.9 * limit:
        warnings.warn(f"model and cache need {need / 2**30:.1f} GiB, close to this device's recommended working "
                      f"set of {limit / 2**30:.1f} GiB: generation may be slow (try --kv-bits or a smaller model)",
                      stacklevel=3)
    old = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize(stream or generation_stream())
        mx.set_wired_limit(old)


def hold_wired_limit() -> int | None:
    """For a long-lived batch (the server's, the batch job's): on Metal wire up to the recommended working set, as
    mlx-lm's server and ``BatchGenerator`` do, and return the previous limit to give back to ``mx.set_wired_limit``
    when the batch closes; None (nothing set) on other backends."""
    limit = backend.wired_limit_bytes()
    return mx.set_wired_limit(limit) if limit else None


def kv_cache_bytes(model: nn.Module, tokens: int, max_kv_size: int | None = None, kv_bits: int | None = None) -> int:
    """Bytes the KV cache will hold for ``tokens`` positions: a rotating cache holds at most ``max_kv_size``; a
    quantized one ``kv_bits`` per value plus a float scale and bias per group (mlx-lm's ``QuantizedKVCache``)."""
    args = model.args
    tokens = min(tokens, max_kv_size) if max_kv_size else tokens
    values = 2 * sum(args.num_kv_heads) * args.head_dim * tokens
    itemsize = model.transformer.norm.weight.dtype.size
    if kv_bits:
        group = min(64, args.head_dim)
        return values * kv_bits // 8 + 2 * (values // group) * itemsize
    return values * itemsize


def check_prompt(prompt: mx.array, prefill_step_size: int | None) -> int:
    """Reject a prompt that is not 1-D token ids, and a chunk size that is not a positive integer; returns the chunk
    size (``None``: the backend's, :func:`~mlx_openelm.backend.prefill_chunk`)."""
    if prompt.ndim != 1:
        raise ValueError(f"prompt must be a 1-D array of token ids, got shape {tuple(prompt.shape)}")
    if prefill_step_size is None:
        return backend.prefill_chunk()
    if not isinstance(prefill_step_size, int) or prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be an integer >= 1, got {prefill_step_size!r}")
    return prefill_step_size


class Forward:
    """A model over its cache, the one way every generation loop runs a model: the compiled
    :class:`~mlx_openelm.decode.DecodeStep` over this project's :class:`~mlx_openelm.cache.KVCache`, or the model's
    own forward pass over mlx-lm's caches (rotating, quantized, or mlx-lm's model class). Both give the same tokens.
    ``compile`` and ``kernels`` are the decode step's."""

    def __init__(self, model: nn.Module, cache: KVCache | list, compile: bool = True, kernels: str = "auto"):
        self.model, self.cache = model, cache
        self.step = None
        if isinstance(cache, KVCache):
            if not isinstance(model, Model):
                raise ValueError(f"a KVCache serves this project's Model, not {type(model).__name__}: use "
                                 "mlx_lm.models.cache.make_prompt_cache for it")
            self.step = DecodeStep(model, compile=compile, kernels=kernels)

    @property
    def offset(self) -> int:
        """Positions the cache holds."""
        return cached_tokens(self.cache)

    def __call__(self, tokens: mx.array, all_logits: bool = False) -> mx.array:
        """Logits after ``tokens[B, L]`` (appended to the cache): ``[B, vocab]`` of the last, or ``[B, L, vocab]``."""
        if self.step is None:
            logits = self.model(tokens, cache=self.cache)
            return logits if all_logits else logits[:, -1, :]
        if not all_logits:
            return self.step(self.cache, tokens)
        return self.step.verify(self.cache, tokens) if tokens.shape[1] > 1 else self.step(self.cache, tokens)[:, None]

    def prefill(self, ids: mx.array, step_size: int, stream: Any) -> None:
        """Put the 1-D ``ids`` into the cache in chunks of ``step_size``, evaluating each chunk."""
        with mx.stream(stream):
            for start in range(0, ids.size, step_size):
                chunk = ids[None, start : start + step_size]
                if self.step is None:
                    self.model(chunk, cache=self.cache)
                    mx.eval([c.state for c in self.cache])
                else:
                    self.step.prefill(self.cache, chunk)
                    mx.eval(self.cache.state)

    def reserve(self, tokens: int) -> None:
        """Size a :class:`KVCache` for ``tokens`` positions up front, so the step neither grows it nor retraces."""
        if self.step is not None:
            self.cache.reserve(tokens)

    def trim(self, n: int) -> None:
        """Forget the last ``n`` cached positions (moves the positions back; nothing is copied)."""
        if n:
            for c in [self.cache] if self.step is not None else self.cache:
                c.trim(n)


def default_cache(model: nn.Module, max_kv_size: int | None = None, kv_bits: int | None = None) -> KVCache | list:
    """``make_cache`` for this project's ``Model``; mlx-lm's own cache for another model class."""
    if isinstance(model, Model):
        return make_cache(model, max_kv_size, kv_bits)
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model, max_kv_size)
