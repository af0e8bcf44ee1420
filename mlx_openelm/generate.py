"""Generation in three layers: token ids (``generate_step``), text responses (``stream_generate``), text (``generate``).

The library never prints; the CLI does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache
from .runner import Forward, check_prompt, default_cache, generation_stream, kv_cache_bytes, token_budget, wired_limit
from .sample import LogitsProcessor, Sampler, choose, greedy
from .speculative import SpeculativeStats, speculative_generate_step


@dataclass(frozen=True)
class GenerationResponse:
    """One generated token as :func:`stream_generate` yields it.

    ``text`` is the new text segment (may be empty); ``finish_reason`` is None until the last response, then
    ``"stop"`` (EOS or a stop string) or ``"length"`` (max tokens or the context limit). Speeds are tokens/s,
    ``peak_memory`` is MLX's peak in GB since generation began. Speculative decoding also reports the draft's
    ``acceptance_rate`` and the ``tokens_per_pass`` of the target so far (None otherwise).
    """

    text: str
    token: int
    finish_reason: str | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    acceptance_rate: float | None = None
    tokens_per_pass: float | None = None


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    prefill_step_size: int | None = None,
    prompt_cache: KVCache | list | None = None,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    compile: bool = True,
    kernels: str = "auto",
    draft_model: nn.Module | None = None,
    num_draft_tokens: int = 3,
    prompt_lookup: int | None = None,
    draft_cache: KVCache | None = None,
    stats: SpeculativeStats | None = None,
    context_ids: Sequence[int] = (),
) -> Iterator[tuple[int, mx.array]]:
    """Yield ``(token id, logprobs[vocab])`` for each generated token, like mlx-lm's ``generate_step``.

    ``prompt`` is a 1-D array of token ids. The prompt is prefilled in chunks of ``prefill_step_size`` (default:
    the backend's, 512 tokens on the CPU and 2048 on a GPU); each
    step is queued (``mx.async_eval``) before the previous token is read. ``prompt_cache`` (from
    ``make_cache``) is updated in place, so a conversation can continue from it; otherwise a cache is made
    with ``max_kv_size`` (a rotating window, generation may then pass the context limit) or ``kv_bits``
    (a quantized cache). Generation stops after ``max_tokens`` or at the model's context limit.

    With this project's :class:`~mlx_openelm.cache.KVCache` (the default) the prompt and each token go through
    the decode step (:class:`~mlx_openelm.decode.DecodeStep`: ``compile=False`` runs it op by op, ``kernels`` as
    there; the cache is sized once for the prompt and the budget); mlx-lm's rotating or quantized caches, and
    mlx-lm's model class, run the model's own forward pass. All give the same tokens. The logprobs of a greedy
    step are computed only if read.

    ``draft_model`` (same vocabulary) or ``prompt_lookup`` (an n-gram size) decode speculatively,
    ``num_draft_tokens`` at a time, with the same output (greedy: token for token; sampling: in distribution);
    see :mod:`mlx_openelm.speculative` (``draft_cache``, ``stats``, ``context_ids``).
    """
    if draft_model is not None or prompt_lookup is not None:
        if max_kv_size is not None or kv_bits is not None:
            raise ValueError("speculative decoding needs the plain KV cache: drop max_kv_size / kv_bits")
        yield from speculative_generate_step(
            prompt, model, draft_model=draft_model, prompt_lookup=prompt_lookup, num_draft_tokens=num_draft_tokens,
            max_tokens=max_tokens, sampler=sampler, logits_processors=logits_processors,
            prefill_step_size=prefill_step_size, prompt_cache=prompt_cache, draft_cache=draft_cache,
            compile=compile, kernels=kernels, stats=stats, context_ids=context_ids)
        return
    prefill_step_size = check_prompt(prompt, prefill_step_size)
    cache = prompt_cache if prompt_cache is not None else default_cache(model, max_kv_size, kv_bits)
    budget = token_budget(model, prompt.size, max_tokens, cache, max_kv_size)
    sampler = sampler or greedy
    processors = list(logits_processors or [])
    history = prompt[:-1]  # the processors' view: every token fed to the model so far
    forward = Forward(model, cache, compile, kernels)
    forward.reserve(forward.offset + prompt.size + budget - 1)  # the last token is never fed back
    stream = generation_stream()

    def step(tokens: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history
        with mx.stream(stream):
            if processors:
                history = mx.concatenate([history, tokens[0].astype(history.dtype)])
            return choose(forward(tokens), sampler, processors, history)

    with wired_limit(model, kv_cache_bytes(model, prompt.size + budget, max_kv_size, kv_bits), stream):
        forward.prefill(prompt[:-1], prefill_step_size, stream)
        y, logprobs = step(prompt[None, -1:])
        mx.async_eval(y)
        for n in range(budget):
            if n + 1 < budget:
                next_y, next_logprobs = step(y[:, None])
                mx.async_eval(next_y)
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


class TextAssembler:
    """Generated token ids -> text pieces, ending the sequence as :func:`stream_generate` does: at EOS, at the first
    stop string (never emitted, even across tokens) or after ``budget`` tokens. Used by every front-end that
    decodes (the generator, the server, the batch job)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], budget: int, continuation: bool = False):
        # ``continuation``: the text follows text already shown (an echoed prompt), so its leading space is kept.
        self.detokenizer, self.eos, self.stops, self.budget = tokenizer.detokenizer(continuation), tokenizer.eos_id, \
            _StopStrings(stop), budget
        self.tokens = 0  # tokens fed, EOS included
        self.kept = 0  # tokens of the completion (EOS excluded)

    def add(self, token: int) -> tuple[str, str | None]:
        """``(text to emit, finish_reason)``: None until the last token, then ``"stop"`` or ``"length"``."""
        self.tokens += 1
        eos = token == self.eos
        self.kept += not eos
        last = eos or self.tokens == self.budget
        text = self.detokenizer.flush() if eos else self.detokenizer.add(token)
        if last and not eos:
            text += self.detokenizer.flush()
        text, stopped = self.stops.feed(text)
        if last and not stopped:
            text += self.stops.flush()
        return text, "stop" if stopped or eos else "length" if last else None


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
    ``prefill_step_size``, ``draft_model``, ``num_draft_tokens``, ``prompt_lookup``, ...). The joined ``text``
    equals ``tokenizer.decode`` of the tokens, up to a stop string.
    """
    ids = _prompt_ids(tokenizer, prompt)
    budget = token_budget(model, ids.size, max_tokens, kwargs.get("prompt_cache"), kwargs.get("max_kv_size"))
    assembler = TextAssembler(tokenizer, stop, budget)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps, first = 0.0, tic
    stats = SpeculativeStats() if kwargs.get("draft_model") is not None or kwargs.get("prompt_lookup") else None
    steps = generate_step(ids, model, max_tokens=budget, sampler=sampler, logits_processors=logits_processors,
                          stats=stats, **kwargs)
    try:
        for n, (token, _) in enumerate(steps, 1):
            if n == 1:
                first = time.perf_counter()
                prompt_tps = ids.size / (first - tic)
            text, reason = assembler.add(token)
            elapsed = time.perf_counter() - first  # speed after the first token, which the prompt time covers
            yield GenerationResponse(text, token, reason, ids.size, prompt_tps, n,
                                     (n - 1) / elapsed if n > 1 else 0.0, mx.get_peak_memory() / 1e9,
                                     stats and stats.acceptance_rate, stats and stats.tokens_per_pass)
            if reason:
                return
    finally:
        steps.close()


def generate(model: nn.Module, tokenizer: Any, prompt: str | list[int] | mx.array, **kwargs: Any) -> str:
    """The whole generated text (``kwargs`` as for :func:`stream_generate`)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
