"""The real ``mlx-openelm serve`` in a subprocess on a free localhost port, spoken to with the official ``openai``
client (and raw HTTP for bad input). Bounded in time: every call has a timeout, every loop a count."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from openai import APITimeoutError, OpenAI
from tiny import tiny_args

from mlx_openelm import random_model, save
from mlx_openelm.tokenizer import Tokenizer
from mlx_openelm.tokenizer_fetch import load_tokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlx-openelm serve`` running on ``url`` (or ``command``, which takes the same arguments); its log collected
    in ``log``."""

    def __init__(self, model: Path, root: Path, *args: str, command: tuple[str, ...] | None = None):
        self.port, self.log = _free_port(), root / f"serve-{time.monotonic_ns()}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        command = command or (str(Path(sys.executable).with_name("mlx-openelm")), "serve")
        self.proc = subprocess.Popen([*command, "--model", str(model), "--port", str(self.port), *args],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"the server did not start: {self.log.read_text()}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, obj=None, raw: bytes | None = None, headers: dict | None = None):
        return self.request("POST", path, raw if raw is not None else json.dumps(obj).encode(),
                            {"Content-Type": "application/json", **(headers or {})})

    def client(self, key: str = "unused") -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(trained_checkpoint, tmp_path_factory):
    """The memorizing model (Instruct chat template), converted, served with batching up to 8."""
    root = tmp_path_factory.mktemp("serve")
    from mlx_openelm.convert import convert

    model = convert(trained_checkpoint.instruct_path, root / "model", dtype="float32").path
    server = Server(model, root, "--max-batch", "8")
    yield server, load_tokenizer(model), trained_checkpoint, model
    assert server.stop() == 0, server.log.read_text()  # SIGTERM: stops accepting, exits 0


def _chat(client, model, content, **kw):
    return client.chat.completions.create(model=str(model), messages=[{"role": "user", "content": content}],
                                          temperature=0, **kw)


def test_chat_answers_with_exact_usage(served):
    server, tok, t, model = served
    r = _chat(server.client(), model, t.prompt, max_tokens=200)
    assert r.choices[0].message.content == t.continuation and r.choices[0].finish_reason == "stop"
    prompt_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": t.prompt}]))
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(t.continuation_ids) - 1  # the tokens of the text; EOS ends it
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == str(model) and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    cut = _chat(server.client(), model, t.prompt, max_tokens=7)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 7
    assert t.continuation.startswith(cut.choices[0].message.content)
    stopped = _chat(server.client(), model, t.prompt, max_tokens=200, stop=["political"])
    assert stopped.choices[0].message.content == t.continuation.split("political")[0]
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_text_equals_the_whole_response(served, kind):
    server, _, t, model = served
    client = server.client()
    if kind == "chat":
        whole = _chat(client, model, t.prompt, max_tokens=40)
        chunks = list(_chat(client, model, t.prompt, max_tokens=40, stream=True,
                            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        expected = whole.choices[0].message.content
    else:
        whole = client.completions.create(model=str(model), prompt=t.prompt, max_tokens=40, temperature=0)
        chunks = list(client.completions.create(model=str(model), prompt=t.prompt, max_tokens=40, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        expected = whole.choices[0].text
        assert expected == t.continuation[: len(expected)] and len(expected) > 50  # the prompt as plain text
    assert text == expected
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    streamed, once = chunks[-1].usage.model_dump(), whole.usage.model_dump()
    # The same prompt again: the second request finds at least as much of it in the prompt cache as the first.
    assert streamed.pop("prompt_tokens_details")["cached_tokens"] >= once.pop("prompt_tokens_details")["cached_tokens"]
    assert chunks[-1].choices == [] and streamed == once


def test_concurrent_requests_decode_in_shared_batches_and_match_alone(served):
    # 8 clients x 4 greedy requests of different lengths at once. Each reply must equal the same request served
    # alone (decoded first, one at a time), and the server's log must show batches of several requests.
    server, _, t, model = served
    words = t.text.split()
    requests = [(" ".join(words[: 3 + (c * 4 + k) % 9]), 8 + 6 * k + c) for c in range(8) for k in range(4)]
    client = server.client()

    def ask(req):
        content, n = req
        r = _chat(client, model, content, max_tokens=n)
        return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason

    alone = [ask(r) for r in requests]
    mark = server.log.read_text().count("\n")
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda c: [ask(r) for r in requests[c * 4 : c * 4 + 4]], range(8), timeout=300))
    assert [a for batch in together for a in batch] == alone
    lines = server.log.read_text().splitlines()[mark:]
    widths = [int(line.split("decode batch of ")[1].split(":")[0]) for line in lines if "decode batch of" in line]
    assert max(widths) >= 4, lines[-20:]
    assert sum("done:" in line for line in lines) == 32


def test_a_chat_that_extends_a_conversation_reuses_its_prefix(served):
    server, _, t, model = served
    client = server.client()
    first = [{"role": "user", "content": t.prompt}]
    reply = client.chat.completions.create(model=str(model), messages=first, temperature=0, max_tokens=20)
    mark = server.log.read_text().count("\n")
    follow = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                      {"role": "user", "content": "And then?"}]
    client.chat.completions.create(model=str(model), messages=follow, temperature=0, max_tokens=5)
    done = [line for line in server.log.read_text().splitlines()[mark:] if "done:" in line]
    reused = int(done[-1].split("(")[1].split(" from")[0])
    assert reused >= len(t.chat_prompt_ids), done


BAD = [  # (path, body, status, code or a piece of the message)
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
     "temperature"),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "model_not_found"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the " * 700}]}, 400,
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 99},
     400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 2.5}, 400, "logprobs"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 999999]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x" * (2 << 20)}, 413, "limit"),
    ("/v1/chat/completions", [1, 2], 400, "JSON object"),
]


@pytest.mark.parametrize("path, body, status, expected", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_an_openai_error_and_the_server_stays_up(served, path, body, status, expected):
    server = served[0]
    got, obj = server.post(path, raw=body) if isinstance(body, bytes) else server.post(path, body)
    assert got == status, obj
    error = obj["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"]
    assert expected in (error["code"] or "") or expected in error["message"] or expected == error["param"]
    status, health = server.get("/health")
    assert status == 200 and health["status"] == "ok", health


@pytest.fixture(scope="module")
def random_served(tmp_path_factory, trained_checkpoint):
    # A random model never emits EOS: long generations, for the disconnect, queue and key tests.
    root = tmp_path_factory.mktemp("serve-random")
    spm = trained_checkpoint.path / "tokenizer.model"
    vocab = Tokenizer.from_file(spm).vocab_size
    wide = tiny_args(vocab_size=vocab, model_dim=512, head_dim=64, num_query_heads=[8, 8, 8], num_kv_heads=[2, 2, 2],
                     ffn_multipliers=[4.0, 4.0, 4.0], max_context_length=2048)  # steps slow enough to interrupt
    model = save(random_model(wide, dtype="float32"), root / "model")
    (model / "tokenizer.model").write_bytes(spm.read_bytes())
    server = Server(model, root, "--max-batch", "1", "--max-queue", "1", "--api-key", "sesame")
    yield server, model
    assert server.stop() == 0, server.log.read_text()


def test_the_api_key_is_required(random_served):
    server, model = random_served
    assert server.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 401
    assert server.post("/v1/completions", {"prompt": "hi", "max_tokens": 2},
                       headers={"Authorization": "Bearer wrong"})[0] == 401
    assert server.get("/v1/models")[0] == 401 and server.get("/health")[0] == 200
    r = server.client("sesame").completions.create(model=str(model), prompt="hi", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_a_full_queue_is_503_and_a_client_that_leaves_frees_its_slot(random_served):
    # One request decodes (max-batch 1) and one may wait (max-queue 1): a third is refused. The streaming client
    # then leaves mid-stream: its slot is freed at the next step and the queued request runs.
    server, model = random_served
    client = server.client("sesame")
    stream = client.completions.create(model=str(model), prompt="a", max_tokens=2000, temperature=0, stream=True)
    next(iter(stream))
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(client.completions.create, model=str(model), prompt="b", max_tokens=3, temperature=0)
        time.sleep(1.0)  # the second request is queued by now
        status, obj = server.post("/v1/completions", {"prompt": "c", "max_tokens": 1},
                                  headers={"Authorization": "Bearer sesame"})
        assert status == 503 and obj["error"]["code"] == "queue_full"
        stream.close()  # the client goes away mid-stream
        assert waiting.result(timeout=60).usage.completion_tokens == 3
    assert "cancelled after" in server.log.read_text()


def test_a_non_streaming_client_that_gives_up_frees_its_slot_at_once(random_served):
    # Tokens keep coming while it waits, so the server's old check (after 0.5 s without an event) never ran: the
    # request decoded on for nobody, holding the only slot. Now its disconnect cancels it within a step.
    server, model = random_served
    mark = server.log.read_text().count("\n")
    slow = OpenAI(base_url=server.url + "/v1", api_key="sesame", max_retries=0, timeout=1.5)
    with pytest.raises(APITimeoutError):
        slow.completions.create(model=str(model), prompt="a", max_tokens=2000, temperature=0)
    left = time.monotonic()
    while time.monotonic() - left < 10 and "cancelled after" not in "".join(server.log.read_text().splitlines()[mark:]):
        time.sleep(0.05)
    lines = [line for line in server.log.read_text().splitlines()[mark:] if "cancelled after" in line]
    assert lines and time.monotonic() - left < 3, server.log.read_text().splitlines()[mark:]
    tokens = int(lines[0].split("cancelled after ")[1].split()[0])
    r = server.client("sesame").completions.create(model=str(model), prompt="b", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2 and tokens < 2000
