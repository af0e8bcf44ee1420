"""The HTTP side: OpenAI-compatible routes over Starlette. Requests become :class:`~.scheduler.Job`s; their events
come back as one JSON response or as server-sent events. No tensors here."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import params
from .params import ApiError, shown
from .scheduler import Job, Scheduler

log = logging.getLogger("mlx_openelm.server")


class Api:
    """The routes' shared state: the model's name and tokenizer, the scheduler, the key and the body limit."""

    def __init__(self, model_id: str, tokenizer: Any, max_context: int, scheduler: Scheduler,
                 api_key: str | None = None, max_body_bytes: int = 1 << 20):
        self.model_id, self.tokenizer, self.max_context = model_id, tokenizer, max_context
        self.scheduler, self.api_key, self.max_body_bytes = scheduler, api_key, max_body_bytes
        self.created = int(time.time())

    def check_key(self, request: Request) -> None:
        """Raise 401 unless the request carries ``Authorization: Bearer KEY``, compared in constant time (a plain
        ``!=`` stops at the first wrong byte, which tells a patient client how much of its guess was right)."""
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "").encode("latin-1")  # the header's bytes, as sent
        if not hmac.compare_digest(got, f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key",
                           kind="authentication_error")

    async def body(self, request: Request) -> dict:
        self.check_key(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            if int(declared) <= 64 * self.max_body_bytes:  # read and drop it, so the client sees the answer and no
                async for _ in request.stream():  # reset mid-send; anything larger is cut off at once
                    pass
            raise ApiError(413, f"the request body is {declared} bytes, more than this server's limit of "
                           f"{self.max_body_bytes}")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body_bytes:
                break
        body = params.body_of(raw, self.max_body_bytes)
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise ApiError(404, f"the model {shown(model)} does not exist here: this server serves "
                           f"{self.model_id!r}", "model", "model_not_found")
        return body

    def token_ids(self, value: Any, field: str) -> list[int]:
        """``value`` as token ids of this vocabulary, or a 400 naming ``field``."""
        if not (isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)):
            raise ApiError(400, f"{field} must be a list of token ids", field)
        bad = [t for t in value if not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"{field}: token {shown(bad[0])} is outside the vocabulary of "
                           f"{self.tokenizer.vocab_size}", field)
        return value

    def encoded(self, prompt: str | list[int]) -> tuple[list[int], str]:
        """A completions prompt's ids (text is encoded with BOS) and its text (what ``echo`` returns)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt), prompt
        ids = self.token_ids(prompt, "prompt")
        return ids, self.tokenizer.decode(ids)

    def job(self, ids: list[int], settings: params.Settings, field: str = "messages") -> tuple[Job, asyncio.Queue]:
        room = self.max_context - len(ids)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(ids)} tokens but the model's context holds {self.max_context}: "
                           "shorten it", field, "context_length_exceeded")
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: tuple) -> None:  # from the scheduler thread
            with contextlib.suppress(RuntimeError):  # the loop closed: the client is gone anyway
                loop.call_soon_threadsafe(queue.put_nowait, event)

        budget = room if settings.max_tokens is None else min(settings.max_tokens, room)
        job = Job(ids, settings, budget, emit=emit)
        self.scheduler.submit(job)
        return job, queue


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def _piece(tokenizer: Any, token: int) -> str:
    """A token as text, for log-probabilities (its leading space kept; a control token is empty)."""
    return tokenizer.decode([token], continuation=True)


def _prompt_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """An echoed prompt's tokens as text, in one pass of a streaming detokenizer: together exactly its text."""
    detokenizer = tokenizer.detokenizer()
    pieces = [detokenizer.add(t) for t in ids]
    pieces[-1] += detokenizer.flush()
    return pieces


def _logprobs(api: Api, kind: str, entries: list, offset: int = 0, pieces: list[str] | None = None) -> dict:
    """The ``logprobs`` object of a choice or chunk: completions' parallel lists (a ``None`` log-probability and
    alternatives for the prompt's first token; ``pieces``, when given, are the first entries' token texts), chat's
    list of token objects."""
    if kind == "completion":
        pieces = pieces or []
        tokens = pieces + [_piece(api.tokenizer, t) for t, _, _ in entries[len(pieces) :]]
        offsets = [offset + sum(map(len, tokens[:k])) for k in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "text_offset": offsets,
                "top_logprobs": [None if top is None else {_piece(api.tokenizer, t): v for t, v in top}
                                 for _, _, top in entries]}

    def item(token: int, logprob: float) -> dict:
        text = _piece(api.tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [item(t, lp) | {"top_logprobs": [item(a, v) for a, v in top]} for t, lp, top in entries]}


def _choice(api: Api, kind: str, index: int, text: str | None, finish: str | None, stream: bool,
            entries: list | None = None, first: bool = False, offset: int = 0, pieces: list[str] | None = None) -> dict:
    logprobs = None if entries is None else _logprobs(api, kind, entries, offset, pieces)
    if kind == "completion":
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    if not stream:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}
    delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


async def _watch(request: Request, jobs: list[tuple[Job, asyncio.Queue]]) -> None:
    # Waits for the client to go away (uvicorn's http.disconnect, sent the moment the connection closes) and then
    # cancels its jobs, which leave the batch at the next step, and wakes the handler with a ("gone",) event.
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - no word from the server: the request goes on
        log.exception("%s: cannot watch for the client's disconnect", jobs[0][0].id)
        return
    for job, queue in jobs:
        job.cancel()
        queue.put_nowait(("gone",))


async def _collect(queue: asyncio.Queue) -> tuple[list[str], list, list | None, tuple]:
    """A job's text pieces, generated tokens' log-probabilities, echoed prompt's, and its last event."""
    parts, entries, prompt = [], [], None
    while (event := await queue.get())[0] in ("text", "prompt"):
        if event[0] == "prompt":
            prompt = event[1]
        else:
            parts.append(event[1])
            entries += event[2]
    return parts, entries, prompt, event


def _echoed(ids: list[int], prompt: list | None) -> list:
    """The echoed prompt's entries: its first token has no log-probability (nothing precedes it)."""
    return [(ids[0], None, None), *(prompt or [])]


async def _respond(api: Api, request: Request, kind: str, prompts: list[tuple[list[int], str]],
                   settings: params.Settings) -> Response:
    # ``prompts``: each prompt's ids and text (echoed); each gets its own choice, in order.
    jobs = []
    try:
        for ids, _ in prompts:
            jobs.append(api.job(ids, settings, "messages" if kind == "chat" else "prompt"))
    except ApiError:
        for job, _ in jobs:
            job.cancel()
        raise
    rid, created = _id(kind), int(time.time())
    obj = "chat.completion" if kind == "chat" else "text_completion"
    head = {"id": rid, "object": obj + (".chunk" if settings.stream and kind == "chat" else ""), "created": created,
            "model": api.model_id}
    wanted = settings.logprobs is not None
    if not settings.stream:
        # Starlette watches a streaming client itself (it cancels the stream below); this one is watched here, so a
        # client that gives up frees its slots at once, not after its whole completion was decoded for nobody.
        watcher = asyncio.create_task(_watch(request, jobs))
        try:
            results = await asyncio.gather(*(_collect(queue) for _, queue in jobs))
        finally:
            watcher.cancel()
            for job, _ in jobs:
                job.cancel()  # no-op once done
        if any(r[3][0] == "gone" for r in results):
            return Response(status_code=499)  # nobody reads it
        for r in results:
            if r[3][0] == "error":
                return _error(r[3][1])
        choices, usage = [], {}
        for index, ((ids, text), (parts, entries, prompt, event)) in enumerate(zip(prompts, results)):
            pieces = None
            if settings.echo:
                entries, pieces = _echoed(ids, prompt) + entries, _prompt_pieces(api.tokenizer, ids)
                parts = [text, *parts]
            choices.append(_choice(api, kind, index, "".join(parts), event[1], False, entries if wanted else None,
                                   pieces=pieces))
            usage = _add_usage(usage, event[2])
        return JSONResponse({**head, "choices": choices, "usage": usage, "system_fingerprint": None})

    ((job, queue),), ((ids, text),) = jobs, prompts  # one prompt (params refuses several with stream)

    async def events() -> AsyncIterator[str]:
        try:
            first, offset = kind == "chat", 0
            if first:
                yield _sse({**head, "choices": [_choice(api, kind, 0, "", None, True, first=True)]})
            while (event := await queue.get())[0] in ("text", "prompt"):
                if event[0] == "prompt":
                    piece, entries, pieces = text, _echoed(ids, event[1]), _prompt_pieces(api.tokenizer, ids)
                else:
                    piece, entries, pieces = event[1], event[2], None
                yield _sse({**head, "choices": [_choice(api, kind, 0, piece, None, True,
                                                        entries if wanted else None, offset=offset, pieces=pieces)]})
                offset += len(piece)
            if event[0] == "error":
                yield _sse(event[1].body())
            else:
                yield _sse({**head, "choices": [_choice(api, kind, 0, None if kind == "chat" else "", event[1],
                                                        True)]})
                if settings.include_usage:
                    yield _sse({**head, "choices": [], "usage": event[2]})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client disconnected mid-stream, or the stream ended: either way the slot is free

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _add_usage(total: dict, usage: dict) -> dict:
    """Usage summed over a request's prompts."""
    if not total:
        return usage
    out = {k: total[k] + usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    cached = total["prompt_tokens_details"]["cached_tokens"] + usage["prompt_tokens_details"]["cached_tokens"]
    return out | {"prompt_tokens_details": {"cached_tokens": cached}}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(api: Api) -> Starlette:
    """The Starlette app: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``, and
    llama-server's ``/tokenize`` and ``/detokenize``."""

    async def chat(request: Request) -> Response:
        try:
            body = await api.body(request)
            settings, messages = params.settings(body, "chat"), params.messages(body)
            try:
                ids = api.tokenizer.encode(api.tokenizer.apply_chat_template(messages))
            except ValueError as e:
                raise ApiError(400, str(e), "messages") from None
            return await _respond(api, request, "chat", [(ids, "")], settings)
        except ApiError as e:
            return _error(e)

    async def completions(request: Request) -> Response:
        try:
            body = await api.body(request)
            settings, prompts = params.settings(body, "completion"), params.prompts(body)
            if settings.stream and len(prompts) > 1:
                raise ApiError(400, "several prompts cannot stream: send them without stream, or one request each",
                               "prompt")
            return await _respond(api, request, "completion", [api.encoded(p) for p in prompts], settings)
        except ApiError as e:
            return _error(e)

    async def tokenize(request: Request) -> Response:
        # llama-server's shape: {"content": text, "add_special": bool} -> {"tokens": [ids]}
        try:
            body = await api.body(request)
            content, special = body.get("content"), body.get("add_special", False)
            if not isinstance(content, str):
                raise ApiError(400, "content must be text", "content")
            if not isinstance(special, bool):
                raise ApiError(400, f"add_special must be true or false, got {shown(special)}", "add_special")
            return JSONResponse({"tokens": api.tokenizer.encode(content, bos=special)})
        except ApiError as e:
            return _error(e)

    async def detokenize(request: Request) -> Response:
        # llama-server's shape: {"tokens": [ids]} -> {"content": text}
        try:
            body = await api.body(request)
            return JSONResponse({"content": api.tokenizer.decode(api.token_ids(body.get("tokens"), "tokens"))})
        except ApiError as e:
            return _error(e)

    async def models(request: Request) -> Response:
        try:
            api.check_key(request)
        except ApiError as e:
            return _error(e)
        return JSONResponse({"object": "list", "data": [{"id": api.model_id, "object": "model",
                                                          "created": api.created, "owned_by": "mlx-openelm"}]})

    async def health(request: Request) -> Response:
        # The scheduler's liveness, and how many requests it holds: 503 once it is gone (nothing would be answered)
        # or while the server shuts down.
        scheduler = api.scheduler
        if not scheduler.alive:
            failure = scheduler.failure
            why = f"{type(failure).__name__}: {failure}" if failure is not None else "stopped"
            return JSONResponse({"status": "error", "error": f"the scheduler is gone ({why})"}, status_code=503)
        if scheduler.draining:
            return JSONResponse({"status": "shutting down", **scheduler.load()}, status_code=503)
        return JSONResponse({"status": "ok", **scheduler.load()})

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    async def internal(request: Request, exc: Exception) -> Response:
        # A bug, not the client's doing: still OpenAI's error object, never a plain-text page (Starlette logs it).
        return _error(ApiError(500, f"internal error ({type(exc).__name__})", kind="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(api.scheduler.stop)  # joins the thread: never on the event loop

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/completions", completions,
              methods=["POST"]), Route("/v1/models", models, methods=["GET"]), Route("/health", health),
              Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: internal},
                     lifespan=lifespan)
