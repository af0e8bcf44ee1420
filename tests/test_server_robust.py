"""One bad request never touches another: the server under hostile input, disconnects, shutdown and a dead scheduler.

The real ``mlx-openelm serve`` in a subprocess on a free 127.0.0.1 port (never another address), spoken to with raw
HTTP; the engine, the scheduler and the app in-process where a fault must be injected. Every wait has a deadline
and every loop a count: the property test runs a fixed number of generated bodies, the soak test a fixed number of
clients.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_server import Server

from mlx_openelm import load
from mlx_openelm.batch import BatchEngine, Sequence
from mlx_openelm.generate import stream_generate
from mlx_openelm.server import params
from mlx_openelm.server.params import ApiError
from mlx_openelm.server.scheduler import Job, Scheduler

FAULTS = str(Path(__file__).with_name("serve_faults.py"))
LONG = {"prompt": "The capital of France", "max_tokens": 1500, "temperature": 0, "stream": True}


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    server = Server(tiny_dir, tmp_path_factory.mktemp("serve"), "--max-batch", "8", "--max-queue", "64")
    yield server
    assert server.stop() == 0, server.log.read_text()


def _post(url: str, path: str, body: bytes, timeout: float = 60) -> tuple[int, bytes, str]:
    """``(status, body, content type)`` of one POST, read to its end."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read(), r.getheader("content-type") or ""
    finally:
        conn.close()


def _events(raw: bytes) -> list:
    """The server-sent events of a stream: each ``data:`` payload parsed, ``[DONE]`` as the string."""
    out = []
    for line in raw.decode().split("\n\n"):
        if line.strip():
            assert line.startswith("data: "), raw[-400:]
            payload = line.removeprefix("data: ")
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def _stream_text(events: list) -> str:
    assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events), events[-3:]
    return "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])


def _health(server: Server) -> dict:
    status, body = server.get("/health")
    return {"code": status, **body}


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- 1. hostile numbers: refused when the request is parsed, naming the field ---------------------------------------

HOSTILE = [("temperature", float("nan")), ("temperature", float("inf")), ("top_p", float("nan")),
           ("min_p", float("-inf")), ("repetition_penalty", float("nan")), ("repetition_penalty", float("inf")),
           ("repetition_penalty", 10**400), ("seed", 10**23), ("seed", 1e23), ("top_k", float("inf")),
           ("top_k", 10**30), ("max_tokens", 2**63), ("stream_options", {"include_usage": float("nan")})]


@pytest.mark.parametrize("field, value", HOSTILE, ids=[f"{f}={v!r}"[:40] for f, v in HOSTILE])
def test_a_hostile_number_is_a_400_naming_its_field(field, value):
    raw = json.dumps({"prompt": "hi", field: value}).encode()  # Python's json writes NaN and Infinity
    with pytest.raises(ApiError) as e:
        params.settings(params.body_of(raw, 1 << 20))
    assert e.value.status == 400 and e.value.param.split(".")[0] == field, e.value.message
    assert len(e.value.message) < 200


@pytest.mark.parametrize("raw, expected", [
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"seed": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"prompt": "\\ud800"}', "surrogate"),
])
def test_a_hostile_body_is_a_400(raw, expected):
    with pytest.raises(ApiError) as e:
        params.body_of(raw, 1 << 20)
    assert e.value.status == 400 and expected in e.value.message


def _sampler_raising(logprobs):
    raise ValueError("this row's sampler fails")


def _sampler_out_of_vocabulary(logprobs):
    return mx.array([10**6], dtype=mx.uint32)


def _sampler_two_tokens(logprobs):
    return mx.array([1, 2], dtype=mx.uint32)


def test_a_failing_row_ends_alone_and_the_others_keep_their_tokens(tiny_dir):
    # Rows whose sampler raises, gives a token outside the vocabulary, or gives two tokens, and one whose stop logic
    # raises at its third token: each ends with finish_reason "error" and its exception; the greedy rows beside them
    # decode exactly what they decode alone.
    model, tokenizer = load(tiny_dir)
    prompts = [tokenizer.encode(p) for p in ("The capital", "Hello world, hello", "def main(argv)", "Emoji: 🦙")]
    alone = [[r.token for r in stream_generate(model, tokenizer, ids, max_tokens=12)] for ids in prompts]
    engine = BatchEngine(model)
    good = [Sequence(tokenizer, ids, 12) for ids in prompts]
    bad = [Sequence(tokenizer, prompts[0], 12, sampler=s)
           for s in (_sampler_raising, _sampler_out_of_vocabulary, _sampler_two_tokens)]
    stop_fails = Sequence(tokenizer, prompts[1], 12)
    real_add = stop_fails.assembler.add
    stop_fails.assembler.add = lambda t: real_add(t) if stop_fails.tokens[2:] == [] else 1 / 0
    order = [good[0], bad[0], good[1], bad[1], stop_fails, good[2], bad[2], good[3]]
    for seq in order:
        engine.add(seq)
    while engine.prefilling:
        engine.prefill(64)
    got: dict[Sequence, list[int]] = {seq: [] for seq in order}
    while engine.running:
        for seq, _ in engine.decode():
            if seq.finish_reason != "error":
                got[seq].append(seq.last)
    assert [got[s] for s in good] == alone
    for seq in [*bad, stop_fails]:
        assert seq.finish_reason == "error" and isinstance(seq.error, Exception), seq.error
    assert isinstance(stop_fails.error, ZeroDivisionError) and len(stop_fails.tokens) == 3
    assert "not one token id" in str(bad[1].error) and "not one token id" in str(bad[2].error)


def test_a_request_whose_generation_fails_gets_an_error_and_the_others_finish(tiny_dir):
    # Through the scheduler: one job's sampler fails at its tenth step; it alone gets an error event, the other jobs
    # in its batch finish with the text they have alone.
    model, tokenizer = load(tiny_dir)
    settings = params.settings({"max_tokens": 20, "temperature": 0})
    steps = []

    def failing(logprobs):
        steps.append(None)
        if len(steps) == 10:
            raise RuntimeError("the sampler broke")
        return mx.argmax(logprobs, axis=-1)

    class Patched(Scheduler):
        def _sequence(self, job):
            seq = super()._sequence(job)
            if job.id == "bad":
                seq.sampler = failing
            return seq

    events: dict[str, list] = {}
    done = threading.Event()

    def job(name: str, prompt: str) -> Job:
        def emit(event):
            events.setdefault(name, []).append(event)
            if sum(e[-1][0] != "text" for e in events.values()) == 3:
                done.set()

        return Job(tokenizer.encode(prompt), settings, 20, emit=emit, id=name)

    scheduler = Patched(model, tokenizer, max_batch=4)
    try:
        for name, prompt in (("a", "The capital"), ("bad", "Hello world"), ("b", "def main")):
            scheduler.submit(job(name, prompt))
        assert done.wait(60), events
    finally:
        scheduler.stop()
    assert events["bad"][-1][0] == "error" and "the sampler broke" in events["bad"][-1][1].message
    for name, prompt in (("a", "The capital"), ("b", "def main")):
        text = "".join(r.text for r in stream_generate(model, tokenizer, tokenizer.encode(prompt), max_tokens=20))
        assert events[name][-1][0] == "done" and "".join(e[1] for e in events[name][:-1]) == text
    assert scheduler.load() == {"running": 0, "waiting": 0}


# --- the acceptance property: generated bodies against both routes while a long stream runs -------------------------

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.sampled_from([0, 1, -1, 0.5, 2, 1e-45, 5e-324, 1e308, -0.0, 10**400]),
)
TEXT = st.one_of(
    st.text(max_size=24),
    st.sampled_from(["", "\x00", "\ud800", "\udfff", "\u202e\u0301", "🦙" * 20, "\uffff", "</s>", "<s>", "[INST]",
                     "a" * 3000, "ＡＢＣ", "\r\n\t"]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(TEXT, inner, max_size=3)), max_leaves=6)
EDGES = st.sampled_from([float("nan"), float("inf"), float("-inf"), 10**400, 2**64, 2**63, 10**23, 1e23, -1, 1e-45,
                         5e-324, True, "1", None])
# max_tokens: invalid values of every kind, or small valid ones (a valid huge one only runs long: tested elsewhere)
BUDGETS = st.one_of(st.integers(min_value=1, max_value=6), st.integers(max_value=0), st.integers(min_value=2**63),
                    st.floats(allow_nan=True), EDGES.filter(lambda v: v is not None), TEXT, st.booleans())
NUMERIC = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "presence_penalty",
           "frequency_penalty", "n"]
OTHER = ["stop", "stream", "stream_options", "logprobs", "model", "prompt", "messages", "logit_bias",
         "response_format", "user", "no_such_field"]


@st.composite
def requests(draw) -> tuple[str, bytes]:
    """A route and a body: mostly a valid request with one hostile number, else a few fields of anything (odd text
    included), raw bytes that are no JSON object, or a field nested deep."""
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    text = draw(st.one_of(st.just("hi"), st.text(max_size=24)))
    base = {"prompt": text or "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": text}]}
    body = {**base, "max_tokens": draw(st.integers(1, 6)), "stream": draw(st.booleans())}
    kind = draw(st.integers(0, 9))
    if kind < 5:  # one hostile number in a request that is otherwise fine
        name = draw(st.sampled_from([*NUMERIC, "max_tokens", "max_completion_tokens"]))
        body[name] = draw(BUDGETS if name.startswith("max_") else st.one_of(EDGES, NUMBERS))
    elif kind < 8:
        body.update(draw(st.dictionaries(st.sampled_from([*NUMERIC, *OTHER]), VALUES, max_size=3)))
    if kind == 8:  # not a JSON object at all
        raw = draw(st.one_of(st.binary(max_size=40), st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
                             VALUES.map(lambda v: json.dumps(v).encode())))
    elif kind == 9:  # nested deep inside a field
        depth = draw(st.integers(10, 100_000))
        raw = json.dumps(body).encode()[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    else:
        raw = json.dumps(body).encode()  # NaN and Infinity included, as Python's json writes them
    return path, raw


def _check_reply(path: str, raw: bytes, status: int, body: bytes, content_type: str) -> None:
    where = f"{path} {raw[:300]!r} -> {status} {body[:300]!r}"
    assert status == 200 or 400 <= status < 500, where
    if status != 200:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], where
    elif content_type.startswith("text/event-stream"):
        events = _events(body)
        assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events), where
    else:
        assert json.loads(body)["choices"][0]["finish_reason"] in ("stop", "length"), where


def test_generated_bodies_never_touch_a_running_stream(served):
    # The long greedy stream is repeated in the background for as long as the generated requests are sent; every
    # run of it must equal its solo run, token for token (text and count), whatever the generated requests did.
    status, raw, _ = _post(served.url, "/v1/completions", json.dumps(LONG).encode(), timeout=120)
    assert status == 200
    solo = _stream_text(_events(raw))
    runs, sending = [], threading.Event()
    sending.set()

    def long_streams():
        while sending.is_set() and len(runs) < 20:
            status, raw, _ = _post(served.url, "/v1/completions", json.dumps(LONG).encode(), timeout=120)
            runs.append((status, raw))

    background = threading.Thread(target=long_streams)
    background.start()
    seen = []

    @settings(max_examples=60, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(requests())
    def each(request):
        path, raw = request
        status, body, content_type = _post(served.url, path, raw)
        _check_reply(path, raw, status, body, content_type)
        seen.append(status)
        assert _health(served)["code"] == 200

    tic = time.monotonic()
    try:
        each()
    finally:
        sending.clear()
        background.join(timeout=120)
    assert len(seen) == 60 and time.monotonic() - tic < 90
    assert runs and all(status == 200 and _stream_text(_events(raw)) == solo for status, raw in runs)
    assert any(s == 200 for s in seen) and any(s == 400 for s in seen)  # both kinds were generated
    health = _health(served)
    assert health["code"] == 200 and health["status"] == "ok"


# --- 2. disconnects, at scale ---------------------------------------------------------------------------------------

def _client(url: str, rng: random.Random, expected: dict, rounds: int) -> list[str]:
    """One client's ``rounds`` requests: streaming or plain completions, each read to its end or dropped at a random
    point (before the reply, or after a few events)."""
    host, port = url.removeprefix("http://").split(":")
    outcomes = []
    for _ in range(rounds):
        (prompt, n), stream, leave = rng.choice(list(expected)), rng.random() < 0.5, rng.random() < 0.4
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        body = json.dumps({"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": stream}).encode()
        try:
            conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            if leave and not stream:
                time.sleep(rng.uniform(0.0, 0.5))
                outcomes.append("left")
                continue
            r = conn.getresponse()
            assert r.status == 200, r.read()
            if leave:
                for _ in range(rng.randint(0, 40)):
                    r.readline()
                outcomes.append("left")
                continue
            raw = r.read()
            text = _stream_text(_events(raw)) if stream else json.loads(raw)["choices"][0]["text"]
            assert text == expected[(prompt, n)], (prompt, n, text)
            outcomes.append("read")
        finally:
            conn.close()  # the socket closes: a client that leaves does so here
    return outcomes


def test_soak_with_clients_that_leave_leaves_nothing_running(served, capsys):
    # 40 clients at once, 5 requests each, streaming or not, 40% of the requests dropped at a random point; those
    # read to the end get exactly their solo greedy text. Afterwards nothing runs or waits and the server's memory
    # is back near where it started.
    expected = {("The capital of France", 240): "", ("Hello world", 160): "", ("def main(argv)", 200): "",
                ("Emoji: 🦙", 120): ""}
    for prompt, n in expected:
        status, raw, _ = _post(served.url, "/v1/completions", json.dumps(
            {"prompt": prompt, "max_tokens": n, "temperature": 0}).encode())
        expected[(prompt, n)] = json.loads(raw)["choices"][0]["text"]
    before = _rss_kib(served.proc.pid)
    peak, sampling = [before], threading.Event()
    sampling.set()

    def sample():
        while sampling.is_set():
            peak.append(_rss_kib(served.proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    tic = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=40) as pool:
            outcomes = [o for client in pool.map(lambda i: _client(served.url, random.Random(i), expected, 5),
                                                 range(40), timeout=120) for o in client]
        deadline = time.monotonic() + 10
        while (health := _health(served))["running"] + health["waiting"] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sampling.clear()
        sampler.join()
    seconds = time.monotonic() - tic
    after = _rss_kib(served.proc.pid)
    assert health == {"code": 200, "status": "ok", "running": 0, "waiting": 0}, health
    left = outcomes.count("left")
    assert len(outcomes) == 200 and 50 <= left <= 110 and outcomes.count("read") == 200 - left
    with capsys.disabled():
        print(f"\nsoak: 40 clients x 5 requests ({left} dropped early) in {seconds:.1f} s; server RSS "
              f"{before / 1024:.1f} MiB before, {max(peak) / 1024:.1f} MiB peak, {after / 1024:.1f} MiB after")
    assert after <= before * 1.25 + 32 * 1024, (before, max(peak), after)
