"""Generation in three layers: token ids (``generate_step``), text responses (``stream_generate``), text (``generate``).

The library never prints; the CLI does.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .cache import is_fixed_capacity, make_cache
from .decode import DecodeStep
from .model import Model
from .sample import LogitsProcessor, Sampler, greedy

# A stream just for generation, so its work queues behind nothing else.
generation_stream = mx.new_thread_local_stream(mx.default_device())


@dataclass(frozen=True)
class GenerationResponse:
    """One generated token as :func:`stream_generate` yields it.

    ``text`` is the new text segment (may be empty); ``finish_reason`` is None until the last response, then
    ``"stop"`` (EOS or a stop string) or ``"length"`` (max tokens or the context limit). Speeds are tokens/s,
    ``peak_memory`` is MLX's peak in GB since generation began.
    """

    text: str
    token: int
    finish_reason: str | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float


def token_budget(model: nn.Module, prompt_tokens: int, max_tokens: int, cache: list | None = None,
                 max_kv_size: int | None = None) -> int:
    """How many tokens may be generated: ``max_tokens``, capped by the context limit unless the cache rotates.

    Raises ``ValueError`` when the prompt (after what ``cache`` already holds) leaves no room.
    """
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if prompt_tokens < 1:
        raise ValueError("the prompt is empty: give at least one token")
    held = cache[0].offset if cache else 0
    limit = getattr(model.args, "max_context_length", None)  # mlx-lm's model class does not record it
    if limit is None:
        return max_tokens
    if held + prompt_tokens >= limit:
        where = f" after {held} cached tokens" if held else ""
        raise ValueError(f"the prompt has {prompt_tokens} tokens{where} but the model's context holds {limit}: "
                         "shorten the prompt")
    rotating = max_kv_size is not None or bool(cache and hasattr(cache[0], "max_size"))
    return max_tokens if rotating else min(max_tokens, limit - held - prompt_tokens)


@contextlib.contextmanager
def wired_limit(model: nn.Module, cache_bytes: int = 0) -> Iterator[None]:
    """On Metal, keep the weights wired while generating, and warn when model + cache near the working set.

    A no-op on other backends (CPU, CUDA).
    """
    limit = mx.device_info().get("max_recommended_working_set_size") if mx.metal.is_available() else None
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
        mx.synchronize(generation_stream)
        mx.set_wired_limit(old)


def _kv_bytes(model: nn.Module, tokens: int) -> int:
    args = model.args
    itemsize = model.transformer.norm.weight.dtype.size
    return 2 * sum(args.num_kv_heads) * args.head_dim * itemsize * tokens


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    prefill_step_size: int = 512,
    prompt_cache: list | None = None,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    compile: bool = True,
) -> Iterator[tuple[int, mx.array]]:
    """Yield ``(token id, logprobs[vocab])`` for each generated token, like mlx-lm's ``generate_step``.

    ``prompt`` is a 1-D array of token ids. The prompt is prefilled in chunks of ``prefill_step_size``; each
    step is queued (``mx.async_eval``) before the previous token is read. ``prompt_cache`` (from
    ``make_cache``) is updated in place, so a conversation can continue from it; otherwise a cache is made
    with ``max_kv_size`` (a rotating window, generation may then pass the context limit) or ``kv_bits``
    (a quantized cache). Generation stops after ``max_tokens`` or at the model's context limit.

    For this project's ``Model`` with a plain cache, the prompt and each token go through
    :class:`~mlx_openelm.decode.DecodeStep` (compiled for the tokens, the cache sized once for the prompt and
    the budget); ``compile=False``, a rotating or quantized cache, or another model class use the model's own
    forward pass instead. Both give the same tokens.
    """
    if prompt.ndim != 1:
        raise ValueError(f"prompt must be a 1-D array of token ids, got shape {tuple(prompt.shape)}")
    if not isinstance(prefill_step_size, int) or prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be an integer >= 1, got {prefill_step_size!r}")
    cache = prompt_cache if prompt_cache is not None else make_cache(model, max_kv_size, kv_bits)
    budget = token_budget(model, prompt.size, max_tokens, cache, max_kv_size)
    sampler = sampler or greedy
    processors = list(logits_processors or [])
    history = prompt[:-1]  # the processors' view: every token fed to the model so far
    # The step reimplements this project's Model; any other model (a wrapper, mlx-lm's class) runs as it is.
    fast = compile and isinstance(model, Model) and is_fixed_capacity(cache)
    decode = DecodeStep(model, cache) if fast else None
    if decode:
        decode.reserve(cache[0].offset + prompt.size + budget - 1)  # the last token is never fed back

    def step(tokens: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history
        with mx.stream(generation_stream):
            logits = decode(tokens) if decode else model(tokens, cache=cache)[:, -1, :]
            if processors:
                history = mx.concatenate([history, tokens[0].astype(history.dtype)])
                for p in processors:
                    logits = p(history, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            return sampler(logprobs), logprobs

    with wired_limit(model, _kv_bytes(model, prompt.size + budget)):
        with mx.stream(generation_stream):
            for start in range(0, prompt.size - 1, prefill_step_size):
                chunk = prompt[None, start : min(start + prefill_step_size, prompt.size - 1)]
                if decode:
                    decode.prefill(chunk)
                else:
                    model(chunk, cache=cache)
                mx.eval([c.state for c in cache])
        y, logprobs = step(prompt[None, -1:])
        mx.async_eval(y, logprobs)
        for n in range(budget):
            if n + 1 < budget:
                next_y, next_logprobs = step(y[:, None])
                mx.async_eval(next_y, next_logprobs)
            yield y.item(), logprobs[0]
            if n + 1 < budget:
                y, logprobs = next_y, next_logprobs


class _StopStrings:
    """Cuts the text stream at the first stop string, holding back text that could begin one."""

    def __init__(self, stops: Sequence[str]):
        if isinstance(stops, str):
            stops = [stops]
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty text, got {s!r}")
        self.stops = list(stops)
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """``(text safe to emit, stopped)`` after appending ``text``."""
        buf = self.held + text
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return buf[: min(found)], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1))
                    if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The held-back text, once the stream has ended without completing a stop string."""
        held, self.held = self.held, ""
        return held


def _prompt_ids(tokenizer: Any, prompt: str | list[int] | mx.array) -> mx.array:
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty: give some text")
        return mx.array(tokenizer.encode(prompt))
    ids = prompt if isinstance(prompt, mx.array) else mx.array(list(prompt), dtype=mx.uint32)
    if ids.size == 0:
        raise ValueError("the prompt is empty: give at least one token")
    return ids.reshape(-1)


def stream_generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | list[int] | mx.array,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    stop: Sequence[str] = (),
    **kwargs: Any,
) -> Iterator[GenerationResponse]:
    """Yield a :class:`GenerationResponse` per generated token, the last one with its ``finish_reason``.

    A string prompt is encoded with BOS; token ids are used as given. Generation stops at EOS, at the first
    of the ``stop`` strings (which is not emitted, even when it spans tokens), after ``max_tokens`` or at the
    context limit. ``kwargs`` go to :func:`generate_step` (``prompt_cache``, ``max_kv_size``, ``kv_bits``,
    ``prefill_step_size``). The joined ``text`` equals ``tokenizer.decode`` of the tokens, up to a stop string.
    """
    ids = _prompt_ids(tokenizer, prompt)
    stops = _StopStrings(stop)
    budget = token_budget(model, ids.size, max_tokens, kwargs.get("prompt_cache"), kwargs.get("max_kv_size"))
    detokenizer, eos = tokenizer.detokenizer(), tokenizer.eos_id
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps, first = 0.0, tic
    steps = generate_step(ids, model, max_tokens=budget, sampler=sampler, logits_processors=logits_processors,
                          **kwargs)
    try:
        for n, (token, _) in enumerate(steps, 1):
            if n == 1:
                first = time.perf_counter()
                prompt_tps = ids.size / (first - tic)
            last = token == eos or n == budget
            text = detokenizer.flush() if token == eos else detokenizer.add(token)
            if last and token != eos:
                text += detokenizer.flush()
            text, stopped = stops.feed(text)
            if last and not stopped:
                text += stops.flush()
            reason = "stop" if stopped or token == eos else "length" if last else None
            elapsed = time.perf_counter() - first  # speed after the first token, which the prompt time covers
            yield GenerationResponse(text, token, reason, ids.size, prompt_tps, n,
                                     (n - 1) / elapsed if n > 1 else 0.0, mx.get_peak_memory() / 1e9)
            if reason:
                return
    finally:
        steps.close()


def generate(model: nn.Module, tokenizer: Any, prompt: str | list[int] | mx.array, **kwargs: Any) -> str:
    """The whole generated text (``kwargs`` as for :func:`stream_generate`)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
