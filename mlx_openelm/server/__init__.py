"""``mlx-openelm serve``: an OpenAI-compatible HTTP server whose concurrent requests decode in one batch.

``params`` parses requests, ``scheduler`` decides who runs each step (continuous batching, prompt-prefix reuse),
``app`` holds the routes; the steps themselves are ``mlx_openelm.batch``. Needs the ``serve`` extra
(``pip install "mlx-openelm[serve]"``: Starlette and uvicorn).
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("mlx_openelm.server")


def exposed(host: str) -> bool:
    """Whether ``host`` is reachable from other machines (anything but a loopback address or ``localhost``)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return True


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8080, max_batch: int = 8, max_queue: int = 32,
          api_key: str | None = None, draft_model: str | None = None, num_draft_tokens: int = 3,
          adapter_path: str | Path | None = None, chat_template: str | Path | None = None,
          prompt_cache_bytes: int = 256 << 20, max_body_bytes: int = 1 << 20, shutdown_grace: float = 5.0) -> None:
    """Load ``model`` and serve it until SIGINT/SIGTERM. Then it stops taking requests (queued ones get a 503 at
    once), gives running ones ``shutdown_grace`` seconds to finish, ends every one still open with an error (a
    stream with an error event and ``[DONE]``) and returns. Should the scheduler thread die, the server stops the
    same way and raises ``SystemExit`` with a non-zero status, so that a supervisor restarts it."""
    try:
        import uvicorn

        from .app import Api, create_app
    except ImportError as e:
        raise ValueError(f'the server needs the serve extra ({e.name} is missing): pip install "mlx-openelm[serve]"'
                         ) from None
    from ..hub import generation_options, load
    from .scheduler import Scheduler

    for name, value, low in (("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0), ("--port", port, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    # num_draft_tokens checked, the draft's vocabulary compared with the model's from both configs, before loading
    draft = generation_options(model, None, draft_model, num_draft_tokens).get("draft_model")
    net, tokenizer = load(model, chat_template=chat_template, adapter_path=adapter_path)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if api_key is None and exposed(host):
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model "
                    "(set --api-key or MLX_OPENELM_API_KEY)", host)

    class Server(uvicorn.Server):
        # uvicorn's shutdown closes the listening sockets, waits for open connections, then cancels what is left and
        # only then runs the app's shutdown. Draining the scheduler first, without blocking the loop, lets every
        # open request end with a proper reply (a stream with an error event and [DONE]) within the grace.
        async def shutdown(self, sockets: Any = None) -> None:
            scheduler.drain(shutdown_grace)
            await super().shutdown(sockets=sockets)

    servers: list[uvicorn.Server] = []

    def on_death(e: BaseException) -> None:  # on the dying scheduler thread: uvicorn's loop notices within 0.1 s
        for s in servers:
            s.should_exit = True

    scheduler = Scheduler(net, tokenizer, max_batch=max_batch, max_queue=max_queue,
                          prompt_cache_bytes=prompt_cache_bytes, draft_model=draft, num_draft_tokens=num_draft_tokens,
                          on_death=on_death)
    api = Api(str(model), tokenizer, net.args.max_context_length, scheduler, api_key, max_body_bytes)
    config = uvicorn.Config(create_app(api), host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=shutdown_grace + 5, access_log=False)
    server = Server(config)
    servers.append(server)
    if scheduler.failure is not None:  # it died already
        server.should_exit = True
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the handlers that were in
    # place before it ran: these record nothing, so a stop by signal is a clean exit (status 0).
    quiet = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        scheduler.stop()
        for sig, handler in quiet.items():
            signal.signal(sig, handler)
    if scheduler.failure is not None:
        e = scheduler.failure
        raise SystemExit(f"error: the server's scheduler thread died ({type(e).__name__}: {e}); exiting with status 1 "
                         "so that a supervisor restarts the server")
