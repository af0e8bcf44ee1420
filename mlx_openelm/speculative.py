"""Speculative decoding: a draft proposes up to K tokens, the target checks all K + 1 positions in one pass of its
compiled step (``DecodeStep.verify``, one trace per length), and the longest acceptable run is kept.

Drafts come from a smaller model with the same vocabulary (OpenELM-270M for the larger sizes) or from the text
itself (prompt lookup: what followed the latest earlier occurrence of the last N tokens, llama.cpp's "lookup"
decoding). Rejected positions are undone by moving the caches' offsets back (``trim``): nothing is copied.

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

import mlx.core as mx
import mlx.nn as nn

from .cache import is_fixed_capacity, make_cache
from .runner import check_prompt, decode_step, generation_stream, kv_cache_bytes, prefill, token_budget, wired_limit
from .sample import FilteredSampler, LogitsProcessor, Sampler, greedy


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


class PromptLookup:
    """Drafts from the context itself: the tokens that followed the latest earlier occurrence of its last ``n``.

    An index from each n-gram to where its recent occurrences ended is updated as tokens are added (O(n) per
    token). When the latest occurrence is too recent to be followed by ``k`` tokens (a repeating stretch), an
    earlier one that is followed by more is used.
    """

    KEEP = 4  # occurrences remembered per n-gram

    def __init__(self, n: int):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"prompt_lookup must be an integer >= 1 (the n-gram to look up), got {n!r}")
        self.n, self.tokens, self._ends = n, [], {}

    def extend(self, tokens: Sequence[int]) -> None:
        """Add ``tokens`` to the context."""
        start = len(self.tokens)
        self.tokens.extend(tokens)
        # Each n-gram that now has a token after it is a place to copy from (the last one, only once it has).
        for end in range(max(self.n, start), len(self.tokens)):
            ends = self._ends.setdefault(tuple(self.tokens[end - self.n : end]), [])
            ends.append(end)
            del ends[: -self.KEEP]

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed an earlier occurrence of the last ``n`` (none if there is none)."""
        ends = self._ends.get(tuple(self.tokens[-self.n :])) if len(self.tokens) >= self.n else None
        if not ends:
            return []
        end = next((e for e in reversed(ends) if len(self.tokens) - e >= k), ends[0])
        return self.tokens[end : end + k]


class _Forward:
    """A model over its cache: the compiled step where it applies (this project's ``Model``), else its forward."""

    def __init__(self, model: nn.Module, cache: list, compile: bool, kernels: str):
        self.model, self.cache = model, cache
        self.decode = decode_step(model, cache, compile, kernels)

    def logits(self, tokens: mx.array) -> mx.array:
        """Logits ``[1, L, vocab]`` of every one of ``tokens[1, L]``, appended to the cache."""
        if self.decode:
            return self.decode.verify(tokens) if tokens.shape[1] > 1 else self.decode(tokens)[:, None]
        return self.model(tokens, cache=self.cache)

    def reserve(self, tokens: int) -> None:
        if self.decode:
            self.decode.reserve(tokens)

    def trim(self, n: int) -> None:
        """Forget the last ``n`` cached positions (moves the offsets; nothing is copied)."""
        if n:
            for c in self.cache:
                c.trim(n)


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


def _normalized(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


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
    prefill_step_size: int = 512,
    prompt_cache: list | None = None,
    draft_cache: list | None = None,
    compile: bool = True,
    kernels: str = "auto",
    stats: SpeculativeStats | None = None,
    context_ids: Sequence[int] = (),
) -> Iterator[tuple[int, mx.array]]:
    """Yield ``(token id, logprobs[vocab])`` like :func:`~mlx_openelm.generate.generate_step`, drafting with
    ``draft_model`` or ``prompt_lookup`` (the n-gram size) ``num_draft_tokens`` at a time.

    ``prompt_cache`` / ``draft_cache`` (plain caches from ``make_cache``) continue a conversation: both must hold
    the same tokens, ``context_ids`` (what they hold, for prompt lookup to draft from). ``stats`` (a
    :class:`SpeculativeStats`) is updated as tokens are produced. ``sampler`` is
    greedy or one made by :func:`~mlx_openelm.sample.make_sampler` (speculative sampling needs its distribution).
    """
    check_prompt(prompt, prefill_step_size)
    check_draft(model, draft_model, prompt_lookup, num_draft_tokens)
    if draft_model is None and prompt_lookup is None:
        raise ValueError("speculative decoding needs a draft_model or prompt_lookup")
    sampler = sampler or greedy
    if sampler is not greedy and not isinstance(sampler, FilteredSampler):
        raise ValueError("speculative sampling needs a sampler from make_sampler (it uses the distribution itself)")
    cache = prompt_cache if prompt_cache is not None else make_cache(model)
    if not is_fixed_capacity(cache):
        raise ValueError("speculative decoding needs the plain KV cache: drop max_kv_size / kv_bits")
    budget = token_budget(model, prompt.size, max_tokens, cache)
    stats = stats if stats is not None else SpeculativeStats()
    processors = list(logits_processors or [])
    stream = generation_stream()
    k_max = num_draft_tokens
    target = _Forward(model, cache, compile, kernels)
    target.reserve(cache[0].offset + prompt.size + budget + k_max)
    draft = None
    if draft_model is not None:
        draft = _Forward(draft_model, draft_cache if draft_cache is not None else make_cache(draft_model), compile,
                         kernels)
        if draft.cache[0].offset != cache[0].offset:
            raise ValueError(f"the draft cache holds {draft.cache[0].offset} tokens and the target's "
                             f"{cache[0].offset}: they must hold the same tokens")
        draft.reserve(cache[0].offset + prompt.size + budget + k_max)
    ids = prompt.tolist()
    lookup = PromptLookup(prompt_lookup) if prompt_lookup is not None else None
    if lookup:
        lookup.extend([*context_ids, *ids])
    history = ids[:-1]  # what the processors see: every token fed so far, as in plain decoding
    pending: list[int] = []  # tokens the draft model has not been fed yet (besides the last)

    def processed(logits: mx.array, fed: list[int]) -> mx.array:
        # logits [1, vocab] after ``fed`` (history + the tokens fed this pass), through the processors.
        if processors:
            h = mx.array(fed)
            for p in processors:
                logits = p(h, logits)
        return logits

    def propose(last: int, k: int) -> tuple[list[mx.array] | list[int], list[mx.array]]:
        # Draft tokens (lazy arrays from the draft model, or ints from lookup) and the draft's logits per token.
        nonlocal pending
        if k == 0:
            pending = pending + [last] if draft else pending
            return [], []
        if lookup:
            return lookup.propose(k), []
        tokens, q_logits, fed = [], [], history + [last]
        logits = draft.logits(mx.array([pending + [last]]))[:, -1]
        pending = []
        for i in range(k):
            logits = processed(logits, fed)
            if sampler is greedy:
                token = mx.argmax(logits, axis=-1)
            else:
                q_logits.append(sampler.logits(_normalized(logits)))
                token = sampler.categorical(q_logits[-1])
            tokens.append(token)
            if i + 1 < k:
                if processors:  # they read the tokens: one host read per draft token, only then
                    fed = fed + [token.item()]
                logits = draft.logits(token[None])[:, -1]
        return tokens, q_logits

    base = cache[0].offset  # what the caches held before this prompt
    with wired_limit(model, kv_cache_bytes(model, prompt.size + budget + k_max), stream):
        with mx.stream(stream):
            prefill(model, cache, target.decode, prompt[:-1], prefill_step_size, stream)
            if draft:
                prefill(draft_model, draft.cache, draft.decode, prompt[:-1], prefill_step_size, stream)
        last, emitted = ids[-1], 0
        seq = list(ids)  # the prompt and every token yielded
        positions = max(model.args.max_context_length, model.args.rope_max_length)
        try:
            while emitted < budget:
                # Drafts are not cut to the budget, so that the last token too can come from an accepted run; only
                # the positions the model supports bound them.
                k = max(0, min(k_max, positions - cache[0].offset - 1))
                with mx.stream(stream):
                    drafts, q_logits = propose(last, k)
                    n = len(drafts)
                    head = mx.array([last], dtype=mx.uint32)
                    row = mx.concatenate([head, *(d.astype(mx.uint32) for d in drafts)]) if n and not lookup \
                        else mx.array([last, *drafts], dtype=mx.uint32)
                    logits = target.logits(row[None])
                    drafted = (drafts if lookup else row[1:].tolist()) if processors else []
                    fed = history + [last]
                    rows = [processed(logits[:, i], fed + drafted[:i]) for i in range(n + 1)]
                    logprobs = [_normalized(r) for r in rows]
                    accepted, bonus = _accept(sampler, rows, logprobs, row[1:], q_logits, n)
                kept = (drafts[:accepted] if lookup else row[1 : 1 + accepted].tolist()) + [bonus]
                target.trim(n - accepted)
                if draft and n:
                    if accepted < n:
                        draft.trim(n - 1 - accepted)
                    else:
                        pending = [kept[-2]]  # the last draft token: proposed, never fed to the draft
                stats.passes += 1
                stats.drafted += n
                stats.accepted += accepted
                stats.runs.append(accepted)
                history += [last] + kept[:-1]
                if lookup:
                    lookup.extend(kept)
                for i, token in enumerate(kept[: budget - emitted]):
                    seq.append(token)
                    emitted += 1  # counted before the yield: a consumer may stop right there
                    yield token, logprobs[i][0]
                last = bonus
        finally:
            # Also when the consumer stops early (EOS, a stop string): as after plain decoding, both caches hold the
            # prompt and every token yielded but the last; the target may hold accepted drafts past it, the draft
            # may lag by the tokens it was not fed yet.
            want = base + len(ids) + emitted - 1
            target.trim(cache[0].offset - want)
            if draft:
                held = draft.cache[0].offset
                if held > want:
                    draft.trim(held - want)
                elif held < want:
                    with mx.stream(stream):
                        draft.logits(mx.array([seq[held - base : want - base]]))
                        mx.eval([c.state for c in draft.cache])


def _accept(sampler: Sampler, logits: list[mx.array], logprobs: list[mx.array], drafts: mx.array,
            q_logits: list[mx.array], n: int) -> tuple[int, int]:
    """``(draft tokens accepted, the token the target adds)`` for one pass (one host read, two when sampling).

    Greedy compares with the argmax of the processed logits, as plain decoding takes it."""
    if sampler is greedy:
        best = mx.concatenate([mx.argmax(x, axis=-1) for x in logits])
        best, drafts = best.tolist(), drafts.tolist()
        a = next((i for i in range(n) if drafts[i] != best[i]), n)
        return a, best[a]
    p_logits = [sampler.logits(lp) for lp in logprobs]
    if n == 0:
        return 0, sampler.categorical(p_logits[0]).item()
    p = mx.softmax(mx.concatenate(p_logits[:n]), axis=-1)  # [n, vocab]
    rows = mx.arange(n)
    q = mx.softmax(mx.concatenate(q_logits), axis=-1) if q_logits else None  # None: point-mass drafts (lookup)
    p_x = p[rows, drafts]
    ratio = p_x / q[rows, drafts] if q is not None else p_x
    keep = (sampler.uniform((n,)) < ratio).tolist()
    a = next((i for i in range(n) if not keep[i]), n)
    if a == n:
        return n, sampler.categorical(p_logits[n]).item()
    residual = p[a] - q[a] if q is not None else p[a] * (mx.arange(p.shape[-1]) != drafts[a])
    residual = mx.maximum(residual, 0)
    # p <= q everywhere only through rounding (a rejection then had probability ~0): draw from p itself.
    residual = mx.where(residual.sum() > 0, residual, p[a])
    return a, sampler.categorical(mx.log(residual)[None]).item()
