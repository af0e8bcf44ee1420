"""``mlx-openelm serve``: an OpenAI-compatible HTTP server whose concurrent requests decode in one batch.

``params`` parses requests, ``scheduler`` decides who runs each step (continuous batching, prompt-prefix reuse),
``app`` holds the routes; the steps themselves are ``mlx_openelm.batch``. Needs the ``serve`` extra
(``pip install "mlx-openelm[serve]"``: Starlette and uvicorn).
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8080, max_batch: int = 8, max_queue: int = 32,
          api_key: str | None = None, draft_model: str | None = None, num_draft_tokens: int = 3,
          adapter_path: str | Path | None = None, chat_template: str | Path | None = None,
          prompt_cache_bytes: int = 256 << 20, max_body_bytes: int = 1 << 20) -> None:
    """Load ``model`` and serve it until SIGINT/SIGTERM: then it stops accepting, gives running requests a short
    grace to finish, cancels the rest and returns."""
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
    scheduler = Scheduler(net, tokenizer, max_batch=max_batch, max_queue=max_queue,
                          prompt_cache_bytes=prompt_cache_bytes, draft_model=draft, num_draft_tokens=num_draft_tokens)
    api = Api(str(model), tokenizer, net.args.max_context_length, scheduler, api_key, max_body_bytes)
    app = create_app(api)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5,
                            access_log=False)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the handlers that were in
    # place before it ran: these record nothing, so a stop by signal is a clean exit (status 0).
    quiet = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run()
    finally:
        scheduler.stop()
        for sig, handler in quiet.items():
            signal.signal(sig, handler)
