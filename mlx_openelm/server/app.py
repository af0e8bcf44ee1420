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

    def job(self, ids: list[int], settings: params.Settings) -> tuple[Job, asyncio.Queue]:
        room = self.max_context - len(ids)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(ids)} tokens but the model's context holds {self.max_context}: "
                           "shorten it", "messages", "context_length_exceeded")
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: tuple) -> None:  # from the scheduler thread
            with contextlib.suppress(RuntimeError):  # the loop closed: the client is gone anyway
                loop.call_soon_threadsafe(queue.put_nowait, event)

        job = Job(ids, settings, min(settings.max_tokens or room, room), emit=emit)
        self.scheduler.submit(job)
        return job, queue


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def _choice(kind: str, text: str | None, finish: str | None, stream: bool, first: bool = False) -> dict:
    if kind == "completion":
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    if not stream:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}
    delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


async def _watch(request: Request, job: Job, queue: asyncio.Queue) -> None:
    # Waits for the client to go away (uvicorn's http.disconnect, sent the moment the connection closes) and then
    # cancels its job, which leaves the batch at the next step, and wakes the handler with a ("gone",) event.
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - no word from the server: the request goes on
        log.exception("%s: cannot watch for the client's disconnect", job.id)
        return
    job.cancel()
    queue.put_nowait(("gone",))


async def _respond(api: Api, request: Request, kind: str, ids: list[int], settings: params.Settings) -> Response:
    job, queue = api.job(ids, settings)
    rid, created = _id(kind), int(time.time())
    obj = "chat.completion" if kind == "chat" else "text_completion"
    head = {"id": rid, "object": obj + (".chunk" if settings.stream and kind == "chat" else ""), "created": created,
            "model": api.model_id}
    if not settings.stream:
        # Starlette watches a streaming client itself (it cancels the stream below); this one is watched here, so a
        # client that gives up frees its slot at once, not after its whole completion was decoded for nobody.
        watcher = asyncio.create_task(_watch(request, job, queue))
        parts = []
        try:
            while (event := await queue.get())[0] == "text":
                parts.append(event[1])
        finally:
            watcher.cancel()
            job.cancel()  # no-op once done
        if event[0] == "gone":
            return Response(status_code=499)  # nobody reads it
        if event[0] == "error":
            return _error(event[1])
        return JSONResponse({**head, "choices": [_choice(kind, "".join(parts), event[1], False)], "usage": event[2],
                             "system_fingerprint": None})

    async def events() -> AsyncIterator[str]:
        try:
            first = kind == "chat"
            if first:
                yield _sse({**head, "choices": [_choice(kind, "", None, True, first=True)]})
            while (event := await queue.get())[0] == "text":
                yield _sse({**head, "choices": [_choice(kind, event[1], None, True)]})
            if event[0] == "error":
                yield _sse(event[1].body())
            else:
                yield _sse({**head, "choices": [_choice(kind, None if kind == "chat" else "", event[1], True)]})
                if settings.include_usage:
                    yield _sse({**head, "choices": [], "usage": event[2]})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client disconnected mid-stream, or the stream ended: either way the slot is free

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(api: Api) -> Starlette:
    """The Starlette app: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``."""

    async def chat(request: Request) -> Response:
        try:
            body = await api.body(request)
            settings, messages = params.settings(body), params.messages(body)
            try:
                ids = api.tokenizer.encode(api.tokenizer.apply_chat_template(messages))
            except ValueError as e:
                raise ApiError(400, str(e), "messages") from None
            return await _respond(api, request, "chat", ids, settings)
        except ApiError as e:
            return _error(e)

    async def completions(request: Request) -> Response:
        try:
            body = await api.body(request)
            settings, prompt = params.settings(body), params.prompt(body)
            ids = api.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
            if max(ids) >= api.tokenizer.vocab_size:
                raise ApiError(400, f"prompt token {max(ids)} is outside the vocabulary of "
                               f"{api.tokenizer.vocab_size}", "prompt")
            return await _respond(api, request, "completion", ids, settings)
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
              methods=["POST"]), Route("/v1/models", models, methods=["GET"]), Route("/health", health)]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: internal},
                     lifespan=lifespan)
