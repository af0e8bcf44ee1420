"""Shutdown, a dead scheduler, the API key and open binds: the real ``mlx-openelm serve`` in a subprocess on a free
127.0.0.1 port (never another address), and the app in-process where a fault must be injected. Every wait has a
deadline. The helpers are ``test_server_robust``'s; the models, ``conftest``'s.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_server import Server
from test_server_robust import FAULTS, LONG, _events, _health, _post

from mlx_openelm import load
from mlx_openelm.server.app import Api, create_app
from mlx_openelm.server.params import ApiError
from mlx_openelm.server.scheduler import Scheduler

# --- 3. shutdown ----------------------------------------------------------------------------------------------------

def test_shutdown_refuses_the_queue_ends_open_streams_with_done_and_exits_0(wide_dir, tmp_path):
    # One stream decodes (max-batch 1), one waits. SIGTERM: the waiting one gets its error event and [DONE] at once
    # (it used to wait out the grace and be cut off), the running one after the grace of 5 s (it used to be cut off with
    # neither), and the server exits 0.
    server = Server(wide_dir, tmp_path, "--max-batch", "1", "--max-queue", "2")
    try:
        _shutdown(server)
    finally:
        server.proc.kill()


def _shutdown(server: Server) -> None:
    streams = {}

    def stream(name: str) -> None:
        status, raw, _ = _post(server.url, "/v1/completions", json.dumps({**LONG, "max_tokens": 1800}).encode())
        streams[name] = (status, raw, time.monotonic())

    with ThreadPoolExecutor(max_workers=2) as pool:
        running = pool.submit(stream, "running")
        deadline = time.monotonic() + 30
        while _health(server)["running"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        waiting = pool.submit(stream, "waiting")
        while _health(server)["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        term = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        running.result(timeout=30)
        waiting.result(timeout=30)
    assert server.proc.wait(timeout=30) == 0, server.log.read_text()
    for name, grace in (("waiting", (0, 1.5)), ("running", (4.5, 8))):
        status, raw, at = streams[name]
        events = _events(raw)
        assert status == 200 and events[-1] == "[DONE]", (name, raw[-300:])
        assert events[-2]["error"]["code"] == "shutting_down", (name, events[-2])
        assert grace[0] <= at - term <= grace[1], (name, at - term)
    assert len([e for e in _events(streams["running"][1]) if "choices" in e]) > 50  # it ran during the grace


# --- 4. a dead scheduler --------------------------------------------------------------------------------------------

def _asgi(app, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
    """One request straight through the ASGI app (no server, no socket)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), (b"authorization", b"Bearer k")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


class _Dying(Scheduler):
    def _loop(self) -> None:
        raise MemoryError("injected")


def test_health_is_503_and_requests_are_refused_once_the_scheduler_is_dead(tiny_dir):
    _, tokenizer = load(tiny_dir)
    deaths = []
    scheduler = _Dying(None, tokenizer, on_death=deaths.append)
    scheduler._thread.join(10)
    app = create_app(Api("m", tokenizer, 2048, scheduler, api_key="k"))
    status, body = _asgi(app, "GET", "/health")
    assert status == 503 and "MemoryError: injected" in body["error"]
    status, body = _asgi(app, "POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}).encode())
    assert status == 503 and body["error"]["code"] == "scheduler_failed"
    assert len(deaths) == 1 and isinstance(deaths[0], MemoryError)


def test_a_dead_scheduler_fails_its_requests_and_the_server_exits_non_zero(tiny_dir, tmp_path):
    # The scheduler thread dies at the first request: that request gets an error at once (it used to wait until its
    # client gave up, /health still ok), and the process exits with status 1, for a supervisor to restart it.
    server = Server(tiny_dir, tmp_path, command=(sys.executable, FAULTS))
    try:
        tic = time.monotonic()
        status, raw, _ = _post(server.url, "/v1/completions", b'{"prompt": "hi", "max_tokens": 5}', timeout=15)
        assert status == 500 and json.loads(raw)["error"]["code"] == "scheduler_failed", raw
        assert server.proc.wait(timeout=20) == 1, server.log.read_text()
        assert time.monotonic() - tic < 15
        assert "the server's scheduler thread died (Fatal: injected" in server.log.read_text()
    finally:
        server.proc.kill()


# --- 5. the API key -------------------------------------------------------------------------------------------------

def test_the_api_key_is_compared_in_constant_time(tiny_dir, monkeypatch):
    import hmac

    from starlette.requests import Request

    from mlx_openelm.server import app as app_module

    calls, real = [], hmac.compare_digest
    monkeypatch.setattr(app_module.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    api = Api("m", None, 2048, None, api_key="sésame")

    def request(header: bytes | None) -> Request:
        headers = [(b"authorization", header)] if header is not None else []
        return Request({"type": "http", "headers": headers})

    api.check_key(request("Bearer sésame".encode()))
    for wrong in (b"Bearer s\xc3\xa9sam", b"Bearer s\xe9same", b"", None):
        with pytest.raises(ApiError) as e:
            api.check_key(request(wrong))
        assert e.value.status == 401
    assert len(calls) == 5 and all(isinstance(a, bytes) and b == "Bearer sésame".encode() for a, b in calls)


WILDCARD_V4, WILDCARD_V6 = ".".join("0" * 4), "::"  # every interface: named here, never bound by a test


@pytest.mark.parametrize("host, exposed", [(WILDCARD_V4, True), (WILDCARD_V6, True), ("192.168.1.10", True),
                                           ("example.org", True), ("127.0.0.1", False), ("::1", False),
                                           ("localhost", False)])
def test_which_hosts_other_machines_can_reach(host, exposed):
    from mlx_openelm import server

    assert server.exposed(host) is exposed


def test_an_exposed_bind_without_a_key_is_warned_about(tiny_dir, monkeypatch, caplog):
    # serve() runs on the loopback address up to the point where uvicorn would bind (run() is replaced: nothing
    # listens), with exposed() answering as for an address other machines reach.
    import uvicorn

    from mlx_openelm import server

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    for seen_from_outside in (True, False):
        monkeypatch.setattr(server, "exposed", lambda host, answer=seen_from_outside: answer)
        caplog.clear()
        with caplog.at_level("WARNING", logger="mlx_openelm.server"):
            server.serve(str(tiny_dir), host="127.0.0.1", port=0)
            server.serve(str(tiny_dir), host="127.0.0.1", port=0, api_key="k")
        warnings = [r.getMessage() for r in caplog.records if "without an API key" in r.getMessage()]
        assert warnings == (["serving on 127.0.0.1 without an API key: anyone who can reach this address can use "
                             "the model (set --api-key or MLX_OPENELM_API_KEY)"] if seen_from_outside else [])
