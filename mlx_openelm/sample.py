"""Samplers and logits processors: small validated functions composed by two factories.

The filters themselves are mlx-lm's (``mlx_lm.sample_utils``); this module validates arguments, fixes the
order (temperature, then top-k, top-p, min-p, as Hugging Face and llama.cpp do) and adds seeded sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_repetition_penalty

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def greedy(logprobs: mx.array) -> mx.array:
    """The most likely token of each row."""
    return mx.argmax(logprobs, axis=-1)


def choose(logits: mx.array, sampler: Sampler = greedy, processors: Sequence[LogitsProcessor] = (),
           history: mx.array | Sequence[int] = ()) -> tuple[mx.array, mx.array]:
    """The token choice every decoding path makes: ``(tokens[B], logprobs[B, vocab])`` from ``logits[B, vocab]``.

    The processors see ``history`` (every token fed so far); the logprobs are of the processed logits, normalized.
    Greedy takes the argmax of the logits themselves (the same token), so the logprobs stay lazy: computed only
    if read.
    """
    if processors:
        history = history if isinstance(history, mx.array) else mx.array(list(history))
        for p in processors:
            logits = p(history, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return (greedy(logits) if sampler is greedy else sampler(logprobs)), logprobs


def _check(name: str, value: float, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def make_sampler(
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
) -> Sampler:
    """A sampler ``logprobs[B, vocab] -> tokens[B]`` for ``generate_step``.

    ``temp`` 0 is greedy (the filters are then irrelevant). Otherwise the log-probabilities are divided by
    ``temp``, then filtered: ``top_k`` keeps the k most likely tokens (0 = off), ``top_p`` the smallest set
    whose probability reaches p (0 or 1 = off, as in mlx-lm), ``min_p`` drops tokens less likely than
    ``min_p`` times the most likely one (0 = off). ``seed`` gives the sampler its own random key, so samplers
    made with the same seed draw the same tokens; without it the global MLX random state is used.
    """
    _check("temp", temp, isinstance(temp, (int, float)) and temp >= 0, "a number >= 0 (0 = greedy)")
    _check("top_p", top_p, isinstance(top_p, (int, float)) and 0 <= top_p <= 1, "in [0, 1] (0 or 1 = off)")
    _check("top_k", top_k, isinstance(top_k, int) and top_k >= 0, "an integer >= 0 (0 = off)")
    _check("min_p", min_p, isinstance(min_p, (int, float)) and 0 <= min_p <= 1, "in [0, 1] (0 = off)")
    _check("seed", seed, seed is None or (isinstance(seed, int) and seed >= 0), "an integer >= 0")
    if temp == 0:
        return greedy

    filters = []
    if top_k > 0:
        # top_k >= vocab keeps everything; mlx-lm's filter would reject it.
        filters.append(lambda x: apply_top_k(x, top_k) if top_k < x.shape[-1] else x)
    if 0 < top_p < 1:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p > 0:
        filters.append(lambda x: apply_min_p(x, min_p))
    return FilteredSampler(temp, filters, seed)


class FilteredSampler:
    """Temperature, then filters, then a categorical draw; made by :func:`make_sampler`.

    Speculative sampling needs the distribution itself (:meth:`logits`) and draws from the same random state
    (:meth:`uniform`, :meth:`categorical`), so they are exposed beside ``__call__``.
    """

    def __init__(self, temp: float, filters: list[Callable[[mx.array], mx.array]], seed: int | None):
        self.temp, self.filters = temp, filters
        self.key = None if seed is None else mx.random.key(seed)
        self._last: tuple[mx.array, mx.array] | None = None

    def logits(self, logprobs: mx.array) -> mx.array:
        """The unnormalized log-probabilities sampled from: ``logprobs / temp``, filtered (dropped tokens -inf).
        The last result is kept, so asking again for the distribution just drawn from computes nothing twice."""
        if self._last is not None and self._last[0] is logprobs:
            return self._last[1]
        x = logprobs * (1 / self.temp)
        for f in self.filters:
            x = f(x)
        self._last = (logprobs, x)
        return x

    def _key(self) -> mx.array | None:
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub

    def categorical(self, logits: mx.array) -> mx.array:
        """A draw from ``softmax(logits)`` per row."""
        return mx.random.categorical(logits, key=self._key())

    def uniform(self, shape: tuple[int, ...]) -> mx.array:
        """Uniform draws in [0, 1)."""
        return mx.random.uniform(shape=shape, key=self._key())

    def __call__(self, logprobs: mx.array) -> mx.array:
        return self.categorical(self.logits(logprobs))


def make_logits_processors(
    repetition_penalty: float | None = None,
    repetition_context_size: int = 64,
) -> list[LogitsProcessor]:
    """Logits processors ``(tokens, logits) -> logits`` for ``generate_step``.

    ``repetition_penalty`` (> 0; 1 or None = off; Apple suggests 1.2 for OpenELM) divides the positive logits
    and multiplies the negative logits of tokens seen in the last ``repetition_context_size`` tokens.
    """
    if repetition_penalty is None or repetition_penalty == 1:
        return []
    ok = isinstance(repetition_penalty, (int, float)) and repetition_penalty > 0
    _check("repetition_penalty", repetition_penalty, ok, "a number > 0 (1 = off)")
    ok = isinstance(repetition_context_size, int) and repetition_context_size >= 1
    _check("repetition_context_size", repetition_context_size, ok, "an integer >= 1")
    return [make_repetition_penalty(repetition_penalty, repetition_context_size)]
