"""Who runs at each step: a thread that admits requests into the running batch, interleaves their chunked prefills
with decode steps, turns each row's tokens into text events and retires rows that finish or are cancelled.

It knows nothing of HTTP: a :class:`Job` carries token ids and settings in, and events out through a callback
(the app forwards them to the request's asyncio queue). What a step computes is ``mlx_openelm.batch``.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ..batch import BatchDecoder, Prefill
from ..generate import TextAssembler, generate_step
from ..runner import generation_stream
from ..sample import make_logits_processors, make_sampler
from .params import ApiError, Settings
from .prefix_cache import PrefixCache

log = logging.getLogger("mlx_openelm.server")
PREFILL_CHUNK = 256  # prompt tokens prefilled between two decode steps (shared by the prompts in flight)


@dataclass(eq=False)
class Job:
    """One request: prompt ids, settings, the token budget, and where its events go.

    Events: ``("text", str)`` pieces, then ``("done", finish_reason, usage)`` or ``("error", ApiError)``.
    """

    ids: list[int]
    settings: Settings
    budget: int
    emit: Callable[[tuple], None]
    id: str = ""
    cancelled: bool = False
    widest_batch: int = 0
    reused: int = 0
    text: TextAssembler | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Stop this request at the next step boundary (its client went away)."""
        self.cancelled = True


class Scheduler:
    """Runs jobs on ``model``: at most ``max_batch`` decode together, ``max_queue`` more may wait (503 beyond)."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 8, max_queue: int = 32,
                 prompt_cache_bytes: int = 256 << 20, draft_model: Any = None, num_draft_tokens: int = 3):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.draft_model, self.num_draft_tokens = draft_model, num_draft_tokens
        self.prefixes = PrefixCache(prompt_cache_bytes)
        self._waiting: collections.deque[Job] = collections.deque()
        self._active = 0  # jobs admitted and not finished (prefilling or decoding)
        self._wake = threading.Condition()
        self._stopping = False
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._run, name="mlx-openelm-scheduler", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises ``ApiError(503)`` when the batch is full and ``max_queue`` requests already wait."""
        with self._wake:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch - self._active):
                raise ApiError(503, f"the server is busy ({self.max_batch} requests decoding, {self.max_queue} "
                               "waiting): retry later", kind="server_error", code="queue_full")
            job.id = job.id or f"req-{next(self._ids)}"
            self._waiting.append(job)
            self._wake.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is queued or running and stop the thread (their clients get a 503 error event)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the scheduler thread did not stop within %.0f s", timeout)

    # --- the thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        self.batch = BatchDecoder(self.model)
        self.prefilling: list[tuple[Job, Prefill]] = []
        self.running: dict[int, Job] = {}  # id(row) -> job
        self._last_batch: tuple = ()
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self.prefilling or self.running):
                    self._wake.wait()
                if self._stopping:
                    break
                admitted = []
                while self._waiting and self._active + len(admitted) < self.max_batch:
                    admitted.append(self._waiting.popleft())
                self._active += len(admitted)
            for job in admitted:
                try:
                    self._admit(job)
                except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
                    log.exception("%s failed", job.id)
                    job.emit(("error", ApiError(500, f"generation failed ({type(e).__name__}: {e})",
                                                kind="server_error")))
                    self._done()
            try:
                self._prefill_chunk()
                self._decode_step()
            except Exception as e:  # noqa: BLE001 - the server stays up: every job in flight gets the error
                log.exception("decoding failed")
                self._fail_all(ApiError(500, f"decoding failed ({type(e).__name__}: {e})", kind="server_error"))
                self.batch = BatchDecoder(self.model)
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        self._fail_all(ApiError(503, "the server shut down", kind="server_error", code="shutting_down"), waiting)
        mx.synchronize(generation_stream())  # nothing of this thread's may still run while the process exits

    def _fail_all(self, error: ApiError, extra: list[Job] = ()) -> None:
        for job in [*extra, *(j for j, _ in self.prefilling), *self.running.values()]:
            job.emit(("error", error))
        self.prefilling, self.running = [], {}
        with self._wake:
            self._active = 0

    def _done(self, n: int = 1) -> None:
        with self._wake:
            self._active -= n

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            return self._done()
        if self.draft_model is not None:
            self._run_speculative(job)
            return self._done()
        prefix = self.prefixes.lookup(job.ids)
        job.reused = 0 if prefix is None else prefix[0][0].shape[2]
        self.prefilling.append((job, self.batch.prefill(job.ids, job.budget, prefix)))
        return None

    def _prefill_chunk(self) -> None:
        # One pass per iteration, between decode steps, for every prompt in flight (together they get about
        # PREFILL_CHUNK tokens): a long prompt never stalls the running requests.
        if not self.prefilling:
            return
        live = [pre for job, pre in self.prefilling if not job.cancelled]
        self.batch.advance(live, max(32, PREFILL_CHUNK // max(1, len(live))))
        still = []
        for job, pre in self.prefilling:
            if job.cancelled:
                self._done()
            elif pre.remaining:
                still.append((job, pre))
            else:
                s = job.settings
                row = self.batch.join(pre, make_sampler(s.temperature, s.top_p, s.top_k, s.min_p, s.seed),
                                      make_logits_processors(s.repetition_penalty), tag=job)
                self.running[id(row)] = job
        self.prefilling = still

    def _decode_step(self) -> None:
        batch = self.batch
        gone = [row for row in batch.rows if row.tag.cancelled]
        if gone:
            self._leave(gone)
            for row in gone:
                log.info("%s cancelled after %d tokens", row.tag.id, row.tag.text.kept if row.tag.text else 0)
        if not batch.rows:
            return
        composition = tuple(r.tag.id for r in batch.rows)
        if composition != self._last_batch:
            log.info("decode batch of %d: %s", len(composition), " ".join(composition))
            self._last_batch = composition
        done = []
        for row, token in zip(list(batch.rows), batch.step()):
            row.tag.widest_batch = max(row.tag.widest_batch, len(batch.rows))
            if self._token(row.tag, token):
                done.append(row)
        for row in done:
            self.prefixes.store(row.history, batch.row_cache(row, row.position))
        self._leave(done)

    def _leave(self, rows: list) -> None:
        self.batch.leave(rows)
        for row in rows:
            self.running.pop(id(row))
        self._done(len(rows))

    def _token(self, job: Job, token: int) -> bool:
        """Turn one generated token into events; True when the job is finished."""
        if job.text is None:
            job.text = TextAssembler(self.tokenizer, job.settings.stop, job.budget)
        text, reason = job.text.add(token)
        if text:
            job.emit(("text", text))
        if reason is None:
            return False
        usage = {"prompt_tokens": len(job.ids), "completion_tokens": job.text.kept,
                 "total_tokens": len(job.ids) + job.text.kept}
        job.emit(("done", reason, usage))
        log.info("%s done: %d prompt tokens (%d from the prompt cache), %d generated, %s; decoded in batches of up "
                 "to %d", job.id, len(job.ids), job.reused, job.text.kept, reason, job.widest_batch)
        return True

    def _run_speculative(self, job: Job) -> None:
        # With a draft model, requests are decoded one at a time through speculative decoding (as mlx_lm.server
        # does): verification batches K + 1 positions of one request instead of one position of several.
        s = job.settings
        steps = generate_step(mx.array(job.ids), self.model, max_tokens=job.budget,
                              sampler=make_sampler(s.temperature, s.top_p, s.top_k, s.min_p, s.seed),
                              logits_processors=make_logits_processors(s.repetition_penalty),
                              draft_model=self.draft_model, num_draft_tokens=self.num_draft_tokens)
        job.widest_batch = 1
        try:
            for token, _ in steps:
                if job.cancelled or self._stopping or self._token(job, token):
                    break
        finally:
            steps.close()
