"""Recorded outputs of the committed stand-ins: the token ids and texts today's code produces, so a refactor of the KV
cache, token choice, speculative decoding or batching can show it changed nothing (``test_recorded_outputs.py``).

``python tests/record_outputs.py`` recomputes everything and writes ``tests/data/recorded_outputs.json``; the test
imports the functions below and compares their results with that file. Record only from code known to be right.

Cases (all on ``standins/openelm-stdlib-target``, loaded with ``mlx_openelm.load``; the draft is
``standins/openelm-stdlib-draft``, same tokenizer):

- ``generate``: ``stream_generate`` greedy on three code prompts; one sampled run (seeded sampler); greedy runs
  with a repetition penalty (each prompt, and one with a short penalty window); one cut by a stop string.
- ``speculative``: the same cases decoded with the draft model (3 drafts a pass), with the draft statistics of the
  last response.
- ``prompt_lookup``: prompt-lookup decoding (n-gram 2, 4 drafts) on prompts that repeat themselves.
- ``batch``: the batch job (``batch_generate``, continuous batching, 3 rows) over prompts of different budgets and
  options; each output line as written.
- ``server``: the real ``mlx-openelm serve`` (a subprocess on a free loopback port), three greedy completions sent at
  once and a chat completion, with the ``openai`` client; text, finish reason and usage.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "standins" / "openelm-stdlib-target"
DRAFT = REPO / "standins" / "openelm-stdlib-draft"
RECORD = Path(__file__).resolve().parent / "data" / "recorded_outputs.json"

PROMPTS = ["def main():\n    ", "import os\nimport sys\n", "class Stack:\n    def push(self, x):\n"]
MAX_TOKENS = 48
SAMPLED = {"temp": 0.8, "top_p": 0.9, "seed": 1234}
PENALTY, PENALTY_WINDOW = 1.3, 6
STOP = ["list of the list"]  # met in the greedy continuation of PROMPTS[0], across tokens

_BLOCK = "def area(width, height):\n    if width < 0 or height < 0:\n        raise ValueError(width, height)\n" \
         "    return width * height\n"
LOOKUP_PROMPTS = [
    _BLOCK + "\n\n" + _BLOCK + "\n\ndef area(",
    "for name in names:\n    print(name.upper())\n    total += len(name)\n\n"
    "for name in names:\n    print(name.upper())\n",
]
LOOKUP = {"prompt_lookup": 2, "num_draft_tokens": 4}

BATCH_SIZE = 3
BATCH_INPUTS = [
    {"id": "a", "prompt": PROMPTS[0], "max_tokens": 24},
    {"id": "b", "prompt": PROMPTS[1], "max_tokens": 40},
    {"id": "c", "prompt": PROMPTS[2], "max_tokens": 8},
    {"id": "d", "prompt": "import json\n\n\ndef load(path):\n", "max_tokens": 32, "temperature": 0.7, "seed": 7},
    {"id": "e", "prompt": "while True:\n    line = input()\n", "max_tokens": 16, "repetition_penalty": 1.3},
    {"id": "f", "prompt": "def read(path):\n    with open(path) as f:\n", "max_tokens": 40, "stop": ["self.path,"]},
]

SERVER_PROMPTS = PROMPTS
SERVER_MAX_TOKENS = 32
SERVER_CHAT = [{"role": "system", "content": '"""Helpers for paths."""'},
               {"role": "user", "content": "import os\n\n\ndef join(a, b):\n"}]
USAGE = ("prompt_tokens", "completion_tokens", "total_tokens")
SERVER_START_S, REQUEST_TIMEOUT_S, STOP_TIMEOUT_S = 60, 60, 30


def load_models():
    """``(target, draft, tokenizer)``: the stand-ins as ``mlx_openelm.load`` gives them."""
    from mlx_openelm import load

    target, tokenizer = load(TARGET)
    draft, _ = load(DRAFT)
    return target, draft, tokenizer


def _run(model, tokenizer, prompt: str, stats: bool = False, **kwargs) -> dict[str, Any]:
    from mlx_openelm import stream_generate

    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS, **kwargs))
    out = {"tokens": [r.token for r in responses], "text": "".join(r.text for r in responses),
           "finish_reason": responses[-1].finish_reason}
    if stats:
        out["acceptance_rate"] = responses[-1].acceptance_rate
        out["tokens_per_pass"] = responses[-1].tokens_per_pass
    return out


def _cases(model, tokenizer, stats: bool, **kwargs) -> dict[str, Any]:
    from mlx_openelm import make_logits_processors, make_sampler

    out = {f"greedy_{i}": _run(model, tokenizer, p, stats, **kwargs) for i, p in enumerate(PROMPTS)}
    out["sampled_0"] = _run(model, tokenizer, PROMPTS[0], stats, sampler=make_sampler(**SAMPLED), **kwargs)
    for i, p in enumerate(PROMPTS):
        out[f"penalty_{i}"] = _run(model, tokenizer, p, stats,
                                   logits_processors=make_logits_processors(repetition_penalty=PENALTY), **kwargs)
    # A short window: which tokens it holds (prompt and generated, at its edge) decides the penalties.
    out["penalty_window_2"] = _run(model, tokenizer, PROMPTS[2], stats, logits_processors=make_logits_processors(
        repetition_penalty=PENALTY, repetition_context_size=PENALTY_WINDOW), **kwargs)
    out["stop_0"] = _run(model, tokenizer, PROMPTS[0], stats, stop=STOP, **kwargs)
    return out


def compute_generate(target, tokenizer) -> dict[str, Any]:
    """Plain decoding: greedy on each prompt, sampled (seeded) on the first, greedy with a penalty on the third."""
    return _cases(target, tokenizer, stats=False)


def compute_speculative(target, draft, tokenizer) -> dict[str, Any]:
    """The same cases decoded with the draft model, 3 drafts a pass."""
    return _cases(target, tokenizer, stats=True, draft_model=draft, num_draft_tokens=3)


def compute_prompt_lookup(target, tokenizer) -> dict[str, Any]:
    """Prompt-lookup decoding, greedy, on prompts that repeat themselves."""
    return {f"greedy_{i}": _run(target, tokenizer, p, stats=True, **LOOKUP) for i, p in enumerate(LOOKUP_PROMPTS)}


def compute_batch(target, tokenizer, folder: Path) -> list[dict[str, Any]]:
    """The batch job's output lines (``id``, ``text``, ``finish_reason``, ``prompt_tokens``, ``completion_tokens``)."""
    from mlx_openelm.jobs.batch_generate import batch_generate

    source, output = Path(folder) / "inputs.jsonl", Path(folder) / "outputs.jsonl"
    source.write_text("".join(json.dumps(obj) + "\n" for obj in BATCH_INPUTS), encoding="utf-8")
    output.unlink(missing_ok=True)
    batch_generate(target, tokenizer, source, output, batch_size=BATCH_SIZE)
    return [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def compute_server(folder: Path) -> dict[str, Any]:
    """Start ``mlx-openelm serve`` on the stand-in target (this checkout's code: ``cli`` and ``mlx_openelm`` from
    ``REPO``), send three greedy completions at once and then one chat completion, always stop the server."""
    from openai import OpenAI

    port, log = _free_port(), Path(folder) / f"serve-{time.monotonic_ns()}.log"
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    code = "import sys; sys.argv[0] = 'mlx-openelm'; from cli import main; main()"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--model", str(TARGET), "--host", "127.0.0.1",
                                 "--port", str(port), "--max-batch", "4"], cwd=REPO, env=env, stdout=sink,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not _health(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.2)
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)

        def complete(prompt: str) -> dict[str, Any]:
            r = client.completions.create(model=str(TARGET), prompt=prompt, max_tokens=SERVER_MAX_TOKENS,
                                          temperature=0)
            return {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason,
                    "usage": {k: getattr(r.usage, k) for k in USAGE}}

        with ThreadPoolExecutor(max_workers=len(SERVER_PROMPTS)) as pool:
            completions = list(pool.map(complete, SERVER_PROMPTS, timeout=3 * REQUEST_TIMEOUT_S))
        r = client.chat.completions.create(model=str(TARGET), messages=SERVER_CHAT, max_tokens=SERVER_MAX_TOKENS,
                                           temperature=0)
        chat = {"text": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason,
                "usage": {k: getattr(r.usage, k) for k in USAGE}}
        return {"completions": completions, "chat": chat}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)


def record_all() -> dict[str, Any]:
    import mlx.core as mx

    target, draft, tokenizer = load_models()
    with tempfile.TemporaryDirectory() as folder:
        return {
            "about": "Outputs of the committed stand-ins recorded by tests/record_outputs.py; checked by "
                     "tests/test_recorded_outputs.py.",
            "mlx": mx.__version__,
            "generate": compute_generate(target, tokenizer),
            "speculative": compute_speculative(target, draft, tokenizer),
            "prompt_lookup": compute_prompt_lookup(target, tokenizer),
            "batch": compute_batch(target, tokenizer, Path(folder)),
            "server": compute_server(Path(folder)),
        }


def dumps(record: dict[str, Any]) -> str:
    """JSON with one key a line and each list of token ids on one line."""
    text = json.dumps(record, indent=1, ensure_ascii=False)
    return re.sub(r"\[\n[\d,\s]+\]", lambda m: json.dumps(json.loads(m.group())), text) + "\n"


def main() -> None:
    sys.path.insert(0, str(REPO))  # this checkout's package, whatever is installed
    import mlx_openelm

    print(f"recording with {mlx_openelm.__file__}", file=sys.stderr)
    record = record_all()
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(dumps(record), encoding="utf-8")
    print(f"wrote {RECORD}", file=sys.stderr)


if __name__ == "__main__":
    main()
