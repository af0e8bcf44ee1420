"""Who runs at each step: a thread that admits requests into the running batch, interleaves their chunked prefills
with decode steps, turns each row's tokens into text events and retires rows that finish or are cancelled.

It knows nothing of HTTP: a :class:`Job` carries token ids and settings in, and events out through a callback
(the app forwards them to the request's asyncio queue). What a step computes is ``mlx_openelm.batch``'s engine.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..batch import BatchEngine, Sequence, top_logprobs
from ..cache import PrefixCache
from ..generate import generate_step
from ..runner import generation_stream
from ..sample import make_logits_processors, make_sampler
from .params import ApiError, Settings

log = logging.getLogger("mlx_openelm.server")
PREFILL_CHUNK = 256  # prompt tokens prefilled between two decode steps (shared by the prompts in flight)


def shutting_down() -> ApiError:
    """The error of a request the server refuses or stops because it is shutting down."""
    return ApiError(503, "the server is shutting down: retry later", kind="server_error", code="shutting_down")


@dataclass(eq=False)
class Job:
    """One request: prompt ids, settings, the token budget, and where its events go.

    Events: with ``settings.echo`` first ``("prompt", entries)`` (each prompt token but the first: its
    log-probability and the most likely alternatives), then ``("text", str, entries)`` pieces (``entries``: the
    log-probabilities of the tokens generated since the last piece, when asked for), then ``("done", finish_reason,
    usage)`` or ``("error", ApiError)``; ``emit`` is called on the scheduler thread and must not block.
    """

    ids: list[int]
    settings: Settings
    budget: int
    emit: Callable[[tuple], None]
    id: str = ""
    cancelled: bool = False
    reported: int = 0  # token log-probabilities already sent

    def cancel(self) -> None:
        """Stop this request at the next step boundary (its client went away)."""
        self.cancelled = True


class Scheduler:
    """Runs jobs on ``model``: at most ``max_batch`` decode together, ``max_queue`` more may wait (503 beyond).

    A job's failure (its sampler, its stop logic) is its own: the others in the batch go on. Should the thread itself
    die, every job in flight gets an error, :attr:`alive` turns False and ``on_death`` is called (the server exits).
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 8, max_queue: int = 32,
                 prompt_cache_bytes: int = 256 << 20, draft_model: Any = None, num_draft_tokens: int = 3,
                 on_death: Callable[[BaseException], None] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.draft_model, self.num_draft_tokens = draft_model, num_draft_tokens
        self.prefixes = PrefixCache(prompt_cache_bytes)
        self.on_death = on_death
        self.failure: BaseException | None = None  # what killed the thread
        self.jobs: dict[Sequence, Job] = {}  # the jobs in the engine
        self._waiting: collections.deque[Job] = collections.deque()
        self._active = 0  # jobs admitted and not finished (prefilling or decoding)
        self._wake = threading.Condition()
        self._stopping = False
        self._deadline: float | None = None  # set by drain(): running jobs end by then
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._run, name="mlx-openelm-scheduler", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the thread runs (False once it died or stopped)."""
        return self._thread.is_alive() and self.failure is None

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` was called: no new job is taken."""
        return self._deadline is not None

    def load(self) -> dict[str, int]:
        """Jobs admitted and not finished (``running``) and queued (``waiting``)."""
        return {"running": self._active, "waiting": len(self._waiting)}

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises ``ApiError(503)`` when the batch is full and ``max_queue`` requests already wait, or
        when the server is shutting down or its scheduler is gone."""
        with self._wake:
            if self.failure is not None or not self._thread.is_alive():
                raise ApiError(503, "the server's scheduler has stopped: the server is restarting", kind="server_error",
                               code="scheduler_failed")
            if self._stopping or self._deadline is not None:
                raise shutting_down()
            if len(self._waiting) >= self.max_queue:  # jobs whose clients left no longer hold a place
                self._waiting = collections.deque(j for j in self._waiting if not j.cancelled)
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch - self._active):
                raise ApiError(503, f"the server is busy ({self.max_batch} requests decoding, {self.max_queue} "
                               "waiting): retry later", kind="server_error", code="queue_full")
            job.id = job.id or f"req-{next(self._ids)}"
            self._waiting.append(job)
            self._wake.notify()

    def drain(self, grace: float) -> None:
        """Begin shutting down without blocking: queued jobs are refused now; running ones have ``grace`` seconds to
        finish, then each gets an error event. Safe to call on the event loop, and more than once."""
        with self._wake:
            if self._deadline is None:
                self._deadline = time.monotonic() + grace
            self._wake.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is queued or running and stop the thread (their clients get a 503 error event). Blocks up to
        ``timeout`` seconds: call it off the event loop."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the scheduler thread did not stop within %.0f s", timeout)

    # --- the thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - a bug, or worse: the server must not go on answering
            with self._wake:
                self.failure = e
                waiting, self._waiting = list(self._waiting), collections.deque()
            log.critical("the scheduler thread died (%s: %s)", type(e).__name__, e, exc_info=e)
            error = ApiError(500, f"the server's scheduler failed ({type(e).__name__}: {e}): the server is restarting",
                             kind="server_error", code="scheduler_failed")
            for job in [*waiting, *self.jobs.values()]:
                with contextlib.suppress(Exception):
                    job.emit(("error", error))
            if self.on_death is not None:
                self.on_death(e)

    def _loop(self) -> None:
        self.engine = BatchEngine(self.model, self.prefixes)
        self._last_batch: tuple = ()
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self.engine.active):
                    self._wake.wait()
                if self._stopping:
                    break
                admitted, refused = [], []
                if self._deadline is not None:  # shutting down: nothing new starts
                    refused, self._waiting = list(self._waiting), collections.deque()
                while self._waiting and self._active + len(admitted) < self.max_batch:
                    admitted.append(self._waiting.popleft())
                self._active += len(admitted)
            for job in refused:
                job.emit(("error", shutting_down()))
            self._echo(admitted)
            for job in admitted:
                try:
                    self._admit(job)
                except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
                    log.exception("%s failed", job.id)
                    job.emit(("error", ApiError(500, f"generation failed ({type(e).__name__}: {e})",
                                                kind="server_error")))
                    self._done()
            if self._past_deadline():
                self._end_running()
            for seq, job in self.jobs.items():  # a client that went away stops its sequence at this step
                if job.cancelled:
                    seq.cancel()
            try:
                # One prefill pass per iteration, between decode steps, for every prompt in flight (together they
                # get about PREFILL_CHUNK tokens): a long prompt never stalls the running requests.
                self._events(self.engine.prefill(max(32, PREFILL_CHUNK // max(1, len(self.engine.prefilling)))))
                self._log_batch()
                self._events(self.engine.decode())
            except Exception as e:  # noqa: BLE001 - the whole step failed (not one row): every job in it is told
                log.exception("decoding failed")
                self._fail_all(ApiError(500, f"decoding failed ({type(e).__name__}: {e})", kind="server_error"))
                self.engine.close()
                self.engine = BatchEngine(self.model, self.prefixes)
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        self._fail_all(ApiError(503, "the server shut down", kind="server_error", code="shutting_down"), waiting)
        self.engine.close()
        mx.synchronize(generation_stream())  # nothing of this thread's may still run while the process exits

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _end_running(self) -> None:
        # The grace is over: every running job gets its error event now and leaves the engine at this step.
        for seq, job in self.jobs.items():
            if not job.cancelled:
                log.info("%s stopped by the shutdown after %d tokens", job.id, seq.generated)
                job.emit(("error", shutting_down()))
                job.cancel()

    def _fail_all(self, error: ApiError, extra: list[Job] = ()) -> None:
        for job in [*extra, *self.jobs.values()]:
            job.emit(("error", error))
        self.jobs = {}
        with self._wake:
            self._active = 0

    def _done(self, n: int = 1) -> None:
        with self._wake:
            self._active -= n

    def _sequence(self, job: Job) -> Sequence:
        s = job.settings
        # An echoed prompt is followed by the generated text exactly as the model continues it (a leading space kept).
        return Sequence(self.tokenizer, job.ids, job.budget, s.stop,
                        make_sampler(s.temperature, s.top_p, s.top_k, s.min_p, s.seed),
                        make_logits_processors(s.repetition_penalty), s.logprobs, continuation=s.echo)

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            return self._done()
        if job.budget == 0:  # the prompt's log-probabilities alone (echo with max_tokens 0)
            job.emit(("done", "length", self._usage(job, None)))
            return self._done()
        if self.draft_model is not None:
            self._run_speculative(job)
            return self._done()
        seq = self._sequence(job)
        self.jobs[seq] = job
        self.engine.add(seq)
        return None

    def _echo(self, jobs: list[Job]) -> None:
        """The ``("prompt", entries)`` event of every echo job admitted now: the prompts scored together in one pass
        when log-probabilities are asked for (an echo without them needs none)."""
        echo = [j for j in jobs if j.settings.echo and not j.cancelled]
        scored = [j for j in echo if j.settings.logprobs is not None]
        try:
            found = self.engine.prompt_logprobs([j.ids for j in scored], max(j.settings.logprobs for j in scored)) \
                if scored else []
        except Exception as e:  # noqa: BLE001 - a failed pass fails these requests alone (they are cancelled)
            log.exception("scoring %d echoed prompts failed", len(scored))
            for job in scored:
                job.emit(("error", ApiError(500, f"scoring the prompt failed ({type(e).__name__}: {e})",
                                            kind="server_error")))
                job.cancel()
            return
        entries = {id(j): [(t, lp, top[: j.settings.logprobs]) for t, lp, top in f] for j, f in zip(scored, found)}
        for job in echo:
            job.emit(("prompt", entries.get(id(job), [])))

    def _log_batch(self) -> None:
        composition = tuple(self.jobs[s].id for s in self.engine.running)
        if composition and composition != self._last_batch:
            log.info("decode batch of %d: %s", len(composition), " ".join(composition))
        self._last_batch = composition or self._last_batch

    def _events(self, events: list) -> None:
        for seq, text in events:
            job = self.jobs[seq]
            if self._emit(job, seq, text):
                del self.jobs[seq]
                self._done()

    def _emit(self, job: Job, seq: Sequence, text: str) -> bool:
        """Turn one step's text into events; True when the job is finished."""
        if seq.finish_reason == "cancelled":
            log.info("%s cancelled after %d tokens", job.id, seq.generated)
            return True
        if seq.finish_reason == "error":  # this request's own sampler or stop logic: it alone fails
            e = seq.error
            log.error("%s failed after %d tokens (%s: %s)", job.id, seq.generated, type(e).__name__, e, exc_info=e)
            job.emit(("error", ApiError(500, f"generation failed ({type(e).__name__}: {e})", kind="server_error")))
            return True
        entries = seq.token_logprobs[job.reported :]
        job.reported += len(entries)
        if text or entries:
            job.emit(("text", text, entries))
        if seq.finish_reason is None:
            return False
        usage = self._usage(job, seq)
        log.info("%s done: %d prompt tokens (%d from the prompt cache), %d generated, %s; decoded in batches of up "
                 "to %d", job.id, len(job.ids), seq.reused, seq.generated, seq.finish_reason, seq.widest_batch)
        job.emit(("done", seq.finish_reason, usage))  # after the log line: a client that reads the log finds it
        return True

    @staticmethod
    def _usage(job: Job, seq: Sequence | None) -> dict:
        done = seq.generated if seq is not None else 0
        return {"prompt_tokens": len(job.ids), "completion_tokens": done, "total_tokens": len(job.ids) + done,
                "prompt_tokens_details": {"cached_tokens": seq.reused if seq is not None else 0}}

    def _run_speculative(self, job: Job) -> None:
        # With a draft model, requests are decoded one at a time through speculative decoding (as mlx_lm.server
        # does): verification batches K + 1 positions of one request instead of one position of several.
        seq = self._sequence(job)
        seq.widest_batch = 1
        steps = generate_step(mx.array(job.ids), self.model, max_tokens=job.budget, sampler=seq.sampler,
                              logits_processors=seq.processors, draft_model=self.draft_model,
                              num_draft_tokens=self.num_draft_tokens)
        try:
            for token, logprobs in steps:
                if seq.logprobs is not None:
                    seq.token_logprobs += top_logprobs(logprobs[None], [token], [seq.logprobs])
                if job.cancelled:
                    break
                if self._stopping or self._past_deadline():
                    job.emit(("error", shutting_down()))
                    break
                if self._emit(job, seq, seq.add(token)):
                    break
        finally:
            steps.close()
