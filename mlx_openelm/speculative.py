"""Speculative decoding: a draft proposes up to K tokens, the target checks all K + 1 positions in one pass of its
compiled step (``DecodeStep.verify``, one trace per length), and the longest acceptable run is kept.

A drafter proposes token ids and is told which were kept (:class:`Drafter`); two implement it: a smaller model with
the same vocabulary (:class:`DraftModel`; OpenELM-270M for the larger sizes) and the text itself
(:class:`PromptLookup`: what followed the latest earlier occurrence of the last N tokens, llama.cpp's "lookup"
decoding). The loop (:func:`speculative_generate_step`, one pass in :func:`speculative_pass`) knows neither.
Rejected positions are undone by moving the caches' positions back (``trim``): nothing is copied.

Greedy decoding keeps a draft token while it equals the target's argmax, so the output is token for token the
plain greedy output (up to floating-point near-ties: a K + 1-token pass may round a logit differently from a
one-token step; the tests see none). Sampling uses standard speculative sampling: a draft token x drawn from q
is kept with probability ``min(1, p(x) / q(x))``, else one token is drawn from ``max(0, p - q)`` renormalized,
which makes the output distribution exactly the target's. Both p and q go through the same logits processors,
temperature and filters (a prompt-lookup draft is a point mass). The draft model's steps and the target's verify
pass are queued without waiting; the host reads once per pass, to learn how many tokens were accepted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, make_cache
from .runner import Forward, check_prompt, generation_stream, kv_cache_bytes, token_budget, wired_limit
from .sample import FilteredSampler, LogitsProcessor, Sampler, choose, greedy


@dataclass
class SpeculativeStats:
    """Counts of one speculative generation, updated as it runs."""

    passes: int = 0  # target forward passes (each checks the drafts and yields one token of its own)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept
    runs: list[int] = field(default_factory=list)  # draft tokens kept by each pass, in order

    @property
    def acceptance_rate(self) -> float:
        """Kept / proposed draft tokens (0 when nothing was proposed)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens produced per target pass: 1 + the accepted drafts of each pass, on average."""
        return (self.accepted + self.passes) / self.passes if self.passes else 0.0


@dataclass(frozen=True)
class Draft:
    """Proposed token ids (``[n]``, uint32, possibly still lazy) and, when they were sampled, the distributions
    they were drawn from (``q``: ``[n, vocab]`` sampler logits); None for a point mass (lookup, or greedy)."""

    tokens: mx.array
    q: mx.array | None = None


class Drafter(Protocol):
    """What the speculative loop needs from a source of drafts."""

    def propose(self, last: int, k: int) -> Draft:
        """Up to ``k`` tokens to follow ``last`` (the newest token, not yet fed to the target)."""

    def commit(self, kept: list[int]) -> None:
        """The target kept ``kept``: the accepted drafts, then its own next token (the next ``last``)."""

    def settle(self, held: list[int]) -> None:
        """The generation ended: the target's cache now holds ``held`` after what it held before the prompt."""


class PromptLookup:
    """Drafts from the context itself: the tokens that followed the latest earlier occurrence of its last ``n``.

    An index from each n-gram to where its recent occurrences ended is updated as tokens are added (O(n) per
    token). When the latest occurrence is too recent to be followed by ``k`` tokens (a repeating stretch), an
    earlier one that is followed by more is used.
    """

    KEEP = 4  # occurrences remembered per n-gram

    def __init__(self, n: int, context: Sequence[int] = ()):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"prompt_lookup must be an integer >= 1 (the n-gram to look up), got {n!r}")
        self.n, self.tokens, self._ends = n, [], {}
        self.extend(context)

    def extend(self, tokens: Sequence[int]) -> None:
        """Add ``tokens`` to the context."""
        start = len(self.tokens)
        self.tokens.extend(tokens)
        # Each n-gram that now has a token after it is a place to copy from (the last one, only once it has).
        for end in range(max(self.n, start), len(self.tokens)):
            ends = self._ends.setdefault(tuple(self.tokens[end - self.n : end]), [])
            ends.append(end)
            del ends[: -self.KEEP]

    def lookup(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed an earlier occurrence of the last ``n`` (none if there is none)."""
        ends = self._ends.get(tuple(self.tokens[-self.n :])) if len(self.tokens) >= self.n else None
        if not ends:
            return []
        end = next((e for e in reversed(ends) if len(self.tokens) - e >= k), ends[0])
        return self.tokens[end : end + k]

    def propose(self, last: int, k: int) -> Draft:
        """The lookup's tokens (``last`` is already the context's last token)."""
        return Draft(mx.array(self.lookup(k) if k else [], dtype=mx.uint32))

    def commit(self, kept: list[int]) -> None:
        self.extend(kept)

    def settle(self, held: list[int]) -> None:
        pass


class DraftModel:
    """Drafts with a smaller model over its own cache, kept in step with the target's: it is fed the tokens the
    target kept, and its rejected positions are trimmed. Its steps are queued without reading the host."""

    def __init__(self, model: nn.Module, cache: KVCache, history: list[int], sampler: Sampler,
                 processors: Sequence[LogitsProcessor], compile: bool, kernels: str):
        self.forward = Forward(model, cache, compile, kernels)
        self.base = self.forward.offset  # what the cache held before this generation
        self.history, self.sampler, self.processors = list(history), sampler, processors
        self.pending: list[int] = []  # kept tokens not fed yet (besides the last)
        self._proposed, self._last = 0, 0

    def propose(self, last: int, k: int) -> Draft:
        self._last, self._proposed = last, k
        if k == 0:
            self.pending.append(last)
            return Draft(mx.array([], dtype=mx.uint32))
        tokens, q, fed = [], [], self.history + [last]
        logits = self.forward(mx.array([self.pending + [last]]), all_logits=True)[:, -1]
        self.pending = []
        for i in range(k):
            token, logprobs = choose(logits, self.sampler, self.processors, fed)
            tokens.append(token)
            if self.sampler is not greedy:
                q.append(self.sampler.logits(logprobs))  # the distribution just drawn from (not computed again)
            if i + 1 < k:
                if self.processors:  # they read the tokens: one host read per draft token, only then
                    fed = fed + [token.item()]
                logits = self.forward(token[None])
        return Draft(mx.concatenate(tokens).astype(mx.uint32), mx.concatenate(q) if q else None)

    def commit(self, kept: list[int]) -> None:
        accepted, n = len(kept) - 1, self._proposed
        if n and accepted < n:
            self.forward.trim(n - 1 - accepted)  # it was fed last and all its drafts but the final one
        elif n:
            self.pending = [kept[-2]]  # its final draft, accepted but never fed
        self.history += [self._last] + kept[:-1]

    def settle(self, held: list[int]) -> None:
        have, want = self.forward.offset, self.base + len(held)
        if have > want:
            self.forward.trim(have - want)
        elif have < want:
            with mx.stream(generation_stream()):
                self.forward(mx.array([held[have - self.base :]]), all_logits=True)
                mx.eval(self.forward.cache.state)

    def prefill(self, ids: mx.array, step_size: int, stream: object) -> None:
        self.forward.prefill(ids, step_size, stream)


def check_draft(model: nn.Module, draft_model: nn.Module | None, prompt_lookup: int | None,
                num_draft_tokens: int) -> None:
    """Reject a draft that cannot work, before any work: a vocabulary that differs from the target's, both kinds
    of draft at once, a bad ``num_draft_tokens``."""
    if draft_model is not None and prompt_lookup is not None:
        raise ValueError("give a draft model or prompt lookup, not both")
    if not isinstance(num_draft_tokens, int) or isinstance(num_draft_tokens, bool) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}")
    if draft_model is not None:
        theirs, ours = draft_model.args.vocab_size, model.args.vocab_size
        if theirs != ours:
            raise ValueError(f"the draft model has a vocabulary of {theirs} tokens and the target {ours}: a draft "
                             "must share the target's tokenizer (OpenELM-270M drafts for every OpenELM size)")


def speculative_pass(target: Forward, drafter: Drafter, last: int, k: int, sampler: Sampler,
                     processors: Sequence[LogitsProcessor], history: list[int],
                     ) -> tuple[list[int], list[mx.array], int]:
    """One pass: draft up to ``k`` tokens after ``last``, score them all in one pass of the target, keep the longest
    acceptable run and the target's own next token. Returns ``(kept tokens, their logprobs, drafts proposed)``."""
    draft = drafter.propose(last, k)
    n = draft.tokens.size
    logits = target(mx.concatenate([mx.array([last], dtype=mx.uint32), draft.tokens])[None], all_logits=True)
    drafted = draft.tokens.tolist() if processors else []  # the processors read the tokens each row follows
    fed = history + [last]
    chosen = [choose(logits[:, i], greedy, processors, fed + drafted[:i]) for i in range(n + 1)]
    kept = _accept(sampler, chosen, draft)
    target.trim(n - (len(kept) - 1))
    drafter.commit(kept)
    return kept, [logprobs[0] for _, logprobs in chosen], n


def speculative_generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    draft_model: nn.Module | None = None,
    prompt_lookup: int | None = None,
    num_draft_tokens: int = 3,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    prefill_step_size: int | None = None,
    prompt_cache: KVCache | None = None,
    draft_cache: KVCache | None = None,
    compile: bool = True,
    kernels: str = "auto",
    stats: SpeculativeStats | None = None,
    context_ids: Sequence[int] = (),
) -> Iterator[tuple[int, mx.array]]:
    """Yield ``(token id, logprobs[vocab])`` like :func:`~mlx_openelm.generate.generate_step`, drafting with
    ``draft_model`` or ``prompt_lookup`` (the n-gram size) ``num_draft_tokens`` at a time.

    ``prompt_cache`` / ``draft_cache`` (from ``make_cache``) continue a conversation: both must hold the same
    tokens, ``context_ids`` (what they hold, for prompt lookup to draft from). ``stats`` (a
    :class:`SpeculativeStats`) is updated as tokens are produced. ``sampler`` is greedy or one made by
    :func:`~mlx_openelm.sample.make_sampler` (speculative sampling needs its distribution).
    """
    prefill_step_size = check_prompt(prompt, prefill_step_size)
    check_draft(model, draft_model, prompt_lookup, num_draft_tokens)
    if draft_model is None and prompt_lookup is None:
        raise ValueError("speculative decoding needs a draft_model or prompt_lookup")
    sampler = sampler or greedy
    if sampler is not greedy and not isinstance(sampler, FilteredSampler):
        raise ValueError("speculative sampling needs a sampler from make_sampler (it uses the distribution itself)")
    cache = prompt_cache if prompt_cache is not None else make_cache(model)
    if not isinstance(cache, KVCache):
        raise ValueError("speculative decoding needs the plain KV cache: drop max_kv_size / kv_bits")
    budget = token_budget(model, prompt.size, max_tokens, cache)
    stats = stats if stats is not None else SpeculativeStats()
    processors = list(logits_processors or [])
    stream = generation_stream()
    target = Forward(model, cache, compile, kernels)
    base, ids = target.offset, prompt.tolist()
    room = base + prompt.size + budget + num_draft_tokens
    target.reserve(room)
    if draft_model is not None:
        drafter = DraftModel(draft_model, draft_cache if draft_cache is not None else make_cache(draft_model),
                             ids[:-1], sampler, processors, compile, kernels)
        if drafter.base != base:
            raise ValueError(f"the draft cache holds {drafter.base} tokens and the target's {base}: they must hold "
                             "the same tokens")
        drafter.forward.reserve(room)
    else:
        drafter = PromptLookup(prompt_lookup, [*context_ids, *ids])
    with wired_limit(model, kv_cache_bytes(model, prompt.size + budget + num_draft_tokens), stream):
        target.prefill(prompt[:-1], prefill_step_size, stream)
        if draft_model is not None:
            drafter.prefill(prompt[:-1], prefill_step_size, stream)
        last, history, emitted = ids[-1], ids[:-1], 0
        seq = list(ids)  # the prompt and every token yielded
        try:
            while emitted < budget:
                # Drafts are not cut to the budget, so that the last token too can come from an accepted run; only
                # the positions the model supports bound them.
                k = max(0, min(num_draft_tokens, model.args.max_positions - target.offset - 1))
                with mx.stream(stream):
                    kept, logprobs, n = speculative_pass(target, drafter, last, k, sampler, processors, history)
                stats.passes += 1
                stats.drafted += n
                stats.accepted += len(kept) - 1
                stats.runs.append(len(kept) - 1)
                history += [last] + kept[:-1]
                for token, lp in zip(kept[: budget - emitted], logprobs):
                    seq.append(token)
                    emitted += 1  # counted before the yield: a consumer may stop right there
                    yield token, lp
                last = kept[-1]
        finally:
            # Also when the consumer stops early (EOS, a stop string): as after plain decoding, both caches hold the
            # prompt and every token yielded but the last; the target may hold accepted drafts past it, the draft
            # model may lag by the tokens it was not fed yet.
            held = seq[: len(ids) + emitted - 1]
            target.trim(target.offset - base - len(held))
            drafter.settle(held)


def _accept(sampler: Sampler, chosen: list[tuple[mx.array, mx.array]], draft: Draft) -> list[int]:
    """The kept tokens of one pass: the accepted drafts, then the target's own (one host read, two when sampling).

    ``chosen`` holds the target's greedy choice and logprobs after the last token and after each draft. Greedy
    keeps drafts while they equal the target's argmax of its processed logits, as plain decoding takes it."""
    n = draft.tokens.size
    if sampler is greedy:
        best = mx.concatenate([token for token, _ in chosen]).tolist()
        drafts = draft.tokens.tolist()
        a = next((i for i in range(n) if drafts[i] != best[i]), n)
        return drafts[:a] + [best[a]]
    p_logits = [sampler.logits(logprobs) for _, logprobs in chosen]
    if n == 0:
        return [sampler.categorical(p_logits[0]).item()]
    drafts = draft.tokens
    p = mx.softmax(mx.concatenate(p_logits[:n]), axis=-1)  # [n, vocab]
    rows = mx.arange(n)
    q = None if draft.q is None else mx.softmax(draft.q, axis=-1)  # None: a point mass (lookup)
    p_x = p[rows, drafts]
    ratio = p_x / q[rows, drafts] if q is not None else p_x
    keep = (sampler.uniform((n,)) < ratio).tolist()
    a = next((i for i in range(n) if not keep[i]), n)
    kept = drafts[:a].tolist()
    if a == n:
        return kept + [sampler.categorical(p_logits[n]).item()]
    residual = p[a] - q[a] if q is not None else p[a] * (mx.arange(p.shape[-1]) != drafts[a])
    residual = mx.maximum(residual, 0)
    # p <= q everywhere only through rounding (a rejection then had probability ~0): draw from p itself.
    residual = mx.where(residual.sum() > 0, residual, p[a])
    return kept + [sampler.categorical(mx.log(residual)[None]).item()]
