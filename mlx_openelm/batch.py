"""Continuous batching: the engine that decodes independent sequences together, each at its own position.

The server's scheduler and the batch job both drive one :class:`BatchEngine`; they decide *who* runs (admission,
queues, chunk sizes), the engine *what* a step computes. A sequence is :meth:`~BatchEngine.add`-ed with its own
one-row cache (a reused prompt prefix, or empty); :meth:`~BatchEngine.prefill` puts the prompts in flight in
together, a chunk per pass (rows right-padded to the longest chunk), and moves each finished prompt's row into
the running batch; :meth:`~BatchEngine.decode` feeds every running row its last token through the compiled decode
step, chooses each row's next token, turns it into text and retires the rows that end. A row never sees another
row's keys (each attends to its own prefix), so a sequence decodes to the same tokens alone or in any batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence as Seq
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import backend
from .cache import KVCache, PrefixCache, cache_dtype, make_cache
from .decode import DecodeStep
from .generate import TextAssembler
from .runner import generation_stream, hold_wired_limit
from .sample import LogitsProcessor, Sampler, choose, greedy


class Sequence:
    """One sequence to decode: the prompt ``ids``, at most ``budget`` new tokens, ended by EOS or a ``stop`` string,
    tokens chosen by ``sampler`` after ``processors``. The engine records its progress here. Without a tokenizer
    there is no text: only the budget ends it."""

    def __init__(self, tokenizer: Any, ids: Seq[int], budget: int, stop: Seq[str] = (), sampler: Sampler | None = None,
                 processors: Seq[LogitsProcessor] = (), logprobs: int | None = None, continuation: bool = False):
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"a sequence generates at least one token, got a budget of {budget!r}")
        self.ids, self.budget = list(ids), budget
        # With ``logprobs`` (N), each generated token's log-probability and the N most likely tokens' are recorded in
        # ``token_logprobs`` (:data:`TokenLogprob`), from the token choice's own distribution.
        self.logprobs = logprobs
        self.token_logprobs: list[TokenLogprob] = []
        self.sampler, self.processors = sampler or greedy, list(processors)
        self.assembler = TextAssembler(tokenizer, stop, budget, continuation) if tokenizer is not None else None
        self.tokens: list[int] = []  # generated so far
        self.history = self.ids[:-1]  # every token fed to the model so far (what the processors see)
        self.last = self.ids[-1]  # the newest token, not fed yet
        self.reused = 0  # prompt tokens that came from the prefix cache
        self.widest_batch = 0  # the most rows it was decoded with
        self.finish_reason: str | None = None  # "stop", "length", "cancelled", or "error" (then ``error`` says why)
        self.error: Exception | None = None
        self.cancelled = False
        self.cache: KVCache | None = None  # its own one-row cache while its prompt is prefilled

    @property
    def generated(self) -> int:
        """Tokens of the completion so far (EOS excluded)."""
        return self.assembler.kept if self.assembler is not None else len(self.tokens)

    @property
    def prefill_left(self) -> int:
        """Prompt tokens still to prefill (all but the last, which the first decode step feeds)."""
        return len(self.ids) - 1 - self.cache.offset if self.cache is not None else 0

    def cancel(self) -> None:
        """Stop at the next step boundary (the client went away)."""
        self.cancelled = True

    def fail(self, error: Exception) -> None:
        """End it now: its sampler, processors or stop logic raised ``error``."""
        self.error, self.finish_reason = error, "error"

    def add(self, token: int) -> str:
        """Take one generated token: the text it completes (held back near a stop string); sets ``finish_reason``
        on the last."""
        self.tokens.append(token)
        if self.assembler is None:
            self.finish_reason = "length" if len(self.tokens) == self.budget else None
            return ""
        text, self.finish_reason = self.assembler.add(token)
        return text


TokenLogprob = tuple[int, float, list[tuple[int, float]]]  # (token, its log-probability, the N most likely, sorted)
Event = tuple[Sequence, str]  # a sequence and its new text; ``finish_reason`` set on its last event


class BatchEngine:
    """The running batch of ``model``: :meth:`add` sequences, :meth:`prefill` their prompts, :meth:`decode` one
    token of every running row. ``prefixes`` (optional) lends prompt prefixes and keeps finished sequences' caches."""

    def __init__(self, model: nn.Module, prefixes: PrefixCache | None = None, kernels: str = "auto"):
        self.model, self.prefixes = model, prefixes
        self.step = DecodeStep(model, kernels=kernels)
        self.cache = KVCache(model.args.num_kv_heads, model.args.head_dim, cache_dtype(model), rows=0)
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.steps = 0  # decode steps so far (the buffer cache is trimmed every backend.clear_cache_every())
        self._old_wired_limit = hold_wired_limit()  # Metal: the weights stay wired until close()

    def close(self) -> None:
        """Give back what the engine holds for its lifetime (Metal's wired limit). Its drivers call it at their end."""
        if self._old_wired_limit is not None:
            mx.synchronize(generation_stream())
            mx.set_wired_limit(self._old_wired_limit)
            self._old_wired_limit = None

    @functools.cached_property
    def scorer(self) -> DecodeStep:
        """The decode step that scores prompts, op by op (every length differs); built on the first echo."""
        return DecodeStep(self.model, compile=False, kernels=self.step.kernels)

    @property
    def active(self) -> int:
        """Sequences in the engine (prefilling or decoding)."""
        return len(self.prefilling) + len(self.running)

    def add(self, seq: Sequence) -> None:
        """Start ``seq``: its cache (sized for its prompt and budget) starts from the longest stored prefix."""
        cache = self.prefixes.lookup(seq.ids) if self.prefixes is not None else None
        seq.reused = 0 if cache is None else cache.offset
        seq.cache = cache if cache is not None else make_cache(self.model)
        seq.cache.reserve(len(seq.ids) + seq.budget)
        self.prefilling.append(seq)

    def prefill(self, chunk: int) -> list[Event]:
        """Prefill up to ``chunk`` more tokens of every prompt in flight, in one pass; prompts that are done join
        the running batch (in the order they were added). Cancelled ones leave: their events are returned."""
        events = self._drop_cancelled(self.prefilling)
        todo = [s for s in self.prefilling if s.prefill_left]
        if todo:
            pieces = [s.ids[s.cache.offset : s.cache.offset + min(chunk, s.prefill_left)] for s in todo]
            width = max(map(len, pieces))
            group = KVCache.like(self.cache, rows=0)
            for s in todo:
                group.extend(s.cache)
            tokens = mx.array([p + [0] * (width - len(p)) for p in pieces], dtype=mx.uint32)
            with mx.stream(generation_stream()):
                self.step.prefill(group, tokens, [len(p) for p in pieces])
            mx.eval(group.state)
            for i, s in enumerate(todo):
                s.cache = group.row(i)
        ready = [s for s in self.prefilling if not s.prefill_left]
        for s in ready:
            self.cache.extend(s.cache)
            s.cache = None
            self.prefilling.remove(s)
            self.running.append(s)
        if ready:
            mx.eval(self.cache.state)  # once for all the rows that joined
        return events

    def decode(self) -> list[Event]:
        """Feed every running row its last token and choose its next: one event per row. Finished rows leave (their
        cache goes to the prefix cache); cancelled rows leave first."""
        events = self._drop_cancelled(self.running)
        if not self.running:
            return events
        with mx.stream(generation_stream()):
            logits = self.step(self.cache, mx.array([[s.last] for s in self.running], dtype=mx.uint32))
            if all(s.sampler is greedy and not s.processors and s.logprobs is None for s in self.running):
                # Every row greedy on its own logits (the usual batch): one argmax for all, the same tokens.
                for s in self.running:
                    s.history.append(s.last)
                tokens: list[int | None] = mx.argmax(logits, axis=-1).tolist()
            else:
                tokens = self._choose(logits)
        self.steps += 1
        every = backend.clear_cache_every()  # rows joining and leaving reallocate whole-batch KV buffers
        if every and self.steps % every == 0:
            mx.clear_cache()
        done = []
        for i, (s, token) in enumerate(zip(self.running, tokens)):
            s.widest_batch, text = max(s.widest_batch, len(self.running)), ""
            if s.error is None:
                s.last = token
                try:
                    text = s.add(token)
                except Exception as e:  # noqa: BLE001 - its stop logic or detokenizer: that row alone
                    s.fail(e)
            events.append((s, text))
            if s.finish_reason:
                done.append(i)
                if self.prefixes is not None and s.error is None and self.prefixes.worth(len(s.history)):
                    self.prefixes.store(s.history, self.cache.copy_prefix(i, len(s.history)))
        self._leave(done)
        return events

    def _choose(self, logits: mx.array) -> list[int | None]:
        """Each running row's token through its own sampler and processors (log-probabilities recorded where asked
        for); a row whose choice fails is failed alone."""
        chosen: list[mx.array | None] = []
        dists: dict[int, mx.array] = {}  # the distributions of the rows that report log-probabilities
        for i, s in enumerate(self.running):
            s.history.append(s.last)
            try:
                token, logprobs = choose(logits[i : i + 1], s.sampler, s.processors, s.history)
                chosen.append(token)
                if s.logprobs is not None:
                    dists[i] = logprobs[0]
            except Exception as e:  # noqa: BLE001 - one row's sampler or processors fail that row alone
                s.fail(e)
                chosen.append(None)
        tokens = self._read(chosen)
        self._record(dists, tokens)
        return tokens

    def _record(self, dists: dict[int, mx.array], tokens: list[int | None]) -> None:
        rows = [i for i in dists if tokens[i] is not None and self.running[i].error is None]
        if not rows:
            return
        found = top_logprobs(mx.stack([dists[i] for i in rows]).astype(mx.float32), [tokens[i] for i in rows],
                             [self.running[i].logprobs for i in rows])
        for i, entry in zip(rows, found):
            self.running[i].token_logprobs.append(entry)

    def prompt_logprobs(self, prompts: list[list[int]], top: int) -> list[list[TokenLogprob]]:
        """Each prompt token's log-probability given the tokens before it, and the ``top`` most likely there (none
        for the first token): one pass over all the prompts (right-padded rows of one cache, through the same token
        choice as decoding)."""
        cache = KVCache.like(self.cache, rows=len(prompts))
        width = max(map(len, prompts)) - 1
        if width == 0:
            return [[] for _ in prompts]
        tokens = mx.array([p[:-1] + [0] * (width + 1 - len(p)) for p in prompts], dtype=mx.uint32)
        with mx.stream(generation_stream()):
            logits = self.scorer.verify(cache, tokens).astype(mx.float32)  # as precise as the model's forward pass
            out = []
            for row, p in zip(logits, prompts):
                _, logprobs = choose(row[: max(len(p) - 1, 1)])
                out.append(top_logprobs(logprobs, p[1:], [top] * (len(p) - 1)) if len(p) > 1 else [])
        return out

    def _read(self, chosen: list[mx.array | None]) -> list[int | None]:
        """Each running row's token: one host read when every row is sound. Otherwise (a row failed already, or
        its choice fails only when evaluated, or is not one token id of the vocabulary) row by row, so that a
        failing row is failed alone and the others keep the tokens they would have had alone."""
        if all(c is not None for c in chosen):
            try:
                both = mx.concatenate(chosen)
                if both.shape == (len(chosen),) and mx.issubdtype(both.dtype, mx.integer):
                    tokens = both.tolist()
                    if 0 <= min(tokens) and max(tokens) < self.model.args.vocab_size:
                        return tokens
            except Exception:  # noqa: BLE001 - found below, row by row
                pass
        tokens: list[int | None] = []
        for s, c in zip(self.running, chosen):
            token = None
            if c is not None:
                try:
                    value = c.tolist() if isinstance(c, mx.array) else c
                    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], int)
                            and 0 <= value[0] < self.model.args.vocab_size):
                        raise ValueError(f"the sampler chose {value!r}, not one token id of the vocabulary of "
                                         f"{self.model.args.vocab_size}")
                    token = value[0]
                except Exception as e:  # noqa: BLE001 - an error that surfaced only at evaluation
                    s.fail(e)
            tokens.append(token)
        return tokens

    def _drop_cancelled(self, seqs: list[Sequence]) -> list[Event]:
        gone = [i for i, s in enumerate(seqs) if s.cancelled]
        for i in gone:
            seqs[i].finish_reason = "cancelled"
        events = [(seqs[i], "") for i in gone]
        if seqs is self.running:
            self._leave(gone)
        else:
            seqs[:] = [s for s in seqs if not s.cancelled]
        return events

    def _leave(self, rows: list[int]) -> None:
        if not rows:
            return
        gone = set(rows)
        keep = [i for i in range(len(self.running)) if i not in gone]
        self.running = [self.running[i] for i in keep]
        self.cache.take(keep)
        mx.eval(self.cache.state)


def top_logprobs(stacked: mx.array, tokens: list[int], tops: list[int]) -> list[TokenLogprob]:
    """For each row of ``stacked`` (``logprobs[rows, vocab]``): its token's own log-probability and the ``top`` most
    likely tokens', most likely first (the token's own is reported even when it is not among them). One host read."""
    own = stacked[mx.arange(len(tokens)), mx.array(tokens)]
    n = max(tops)
    if n == 0:
        return [(t, o, []) for t, o in zip(tokens, own.tolist())]
    # The n best by a partition, then only those n sorted (never the whole vocabulary).
    best = mx.argpartition(-stacked, n - 1, axis=-1)[:, :n]
    values = mx.take_along_axis(stacked, best, axis=-1)
    order = mx.argsort(-values, axis=-1)
    ids, values = mx.take_along_axis(best, order, axis=-1).tolist(), mx.take_along_axis(values, order, axis=-1).tolist()
    return [(t, o, list(zip(i[:k], v[:k]))) for t, o, i, v, k in zip(tokens, own.tolist(), ids, values, tops)]
