"""Log-probabilities from the real server (stand-in target, float32): echoed prompts equal the model's forward pass,
top alternatives are sorted and a sampled token's own is always reported, prompt lists get their own choices, chat
logprobs, cached tokens, /tokenize and /detokenize; and lm-evaluation-harness's own ``local-completions`` client
evaluates through the server exactly as ``mlx-openelm eval`` does in process."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest
from test_evaluate import DOCS, TASK
from test_server import Server

from mlx_openelm import load
from mlx_openelm.evaluate import model_class

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from mlx_openelm.convert import convert

    root = tmp_path_factory.mktemp("logprobs")
    folder = convert(REPO / "standins" / "openelm-stdlib-target", root / "model", dtype="float32").path
    server = Server(folder, root, "--max-batch", "8")
    model, tokenizer = load(folder)
    yield server, folder, model, tokenizer
    assert server.stop() == 0, server.log.read_text()


def _forward(model, ids: list[int]) -> mx.array:
    """logprobs[position, vocab] after each prefix of ``ids`` (an independent, unbatched pass)."""
    logits = model(mx.array(ids)[None])[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def test_echoed_prompt_logprobs_are_the_forward_pass(served):
    server, folder, model, tokenizer = served
    ids = tokenizer.encode("import os\nimport sys\n\ndef main():\n    return os.path")
    status, r = server.post("/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 3})
    assert status == 200, r
    (choice,) = r["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == tokenizer.decode(ids) and r["usage"]["completion_tokens"] == 0
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids)
    want = _forward(model, ids)
    for p in range(1, len(ids)):
        assert abs(lp["token_logprobs"][p] - want[p - 1, ids[p]].item()) < 1e-4
        top = list(lp["top_logprobs"][p].values())
        assert top == sorted(top, reverse=True) and len(top) <= 3
        assert abs(top[0] - mx.max(want[p - 1]).item()) < 1e-4


def test_a_sampled_tokens_own_logprob_is_reported_even_off_the_top(served):
    server, folder, model, tokenizer = served
    status, r = server.post("/v1/completions", {"prompt": "def main():\n", "max_tokens": 24, "logprobs": 1,
                                                "temperature": 2.0, "seed": 11})
    assert status == 200, r
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) >= r["usage"]["completion_tokens"]
    off_top = 0
    for token, own, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        (best,) = top.values()
        assert own <= best + 1e-6
        off_top += token not in top
    assert off_top > 0  # at temperature 2 some sampled tokens are not the most likely: still reported


def test_each_prompt_of_a_list_gets_its_own_choice_in_order(served):
    server, folder, model, tokenizer = served
    prompts = ["import os\n", tokenizer.encode("class Stack:\n"), "def f(x):\n    return"]
    status, r = server.post("/v1/completions", {"prompt": prompts, "max_tokens": 12, "temperature": 0})
    assert status == 200, r
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    singles = [server.post("/v1/completions", {"prompt": p, "max_tokens": 12, "temperature": 0})[1] for p in prompts]
    assert [c["text"] for c in r["choices"]] == [s["choices"][0]["text"] for s in singles]
    assert r["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in singles)
    status, r = server.post("/v1/completions", {"prompt": prompts, "max_tokens": 4, "stream": True})
    assert status == 400 and r["error"]["param"] == "prompt"


def test_chat_logprobs_and_cached_tokens(served):
    server, folder, model, tokenizer = served
    client = server.client()
    messages = [{"role": "user", "content": "import os\nimport sys\nimport json\nimport time\n"}]
    first = client.chat.completions.create(model=str(folder), messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = first.choices[0].logprobs.content
    assert len(content) >= first.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob and c.bytes == list(c.token.encode())
               for c in content)
    again = client.chat.completions.create(model=str(folder), messages=messages, max_tokens=8, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the first request's prompt, from the prefix cache
    assert first.usage.prompt_tokens_details.cached_tokens == 0


def test_tokenize_and_detokenize_in_llama_servers_shape(served):
    server, folder, model, tokenizer = served
    text = "def main():\n    return 42\n"
    assert server.post("/tokenize", {"content": text}) == (200, {"tokens": tokenizer.encode(text, bos=False)})
    status, r = server.post("/tokenize", {"content": text, "add_special": True})
    assert r["tokens"] == tokenizer.encode(text)
    assert server.post("/detokenize", {"tokens": r["tokens"]}) == (200, {"content": text})
    status, r = server.post("/detokenize", {"tokens": [10**9]})
    assert status == 400 and r["error"]["param"] == "tokens"


def test_lm_evals_own_client_evaluates_through_the_server_as_in_process(served, tmp_path):
    server, folder, model, tokenizer = served
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "stdlib_choice.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    args = (f"model={folder},base_url={server.url}/v1/completions,tokenizer={folder},tokenizer_backend=huggingface,"
            "add_bos_token=True,tokenized_requests=True,num_concurrent=2,max_retries=1")
    p = subprocess.run([str(Path(sys.executable).with_name("lm_eval")), "run", "--model", "local-completions",
                        "--model_args", args, "--batch_size", "4", "--tasks", "stdlib_choice", "--include_path",
                        str(tmp_path / "tasks"), "--log_samples", "--output_path", str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (results,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    (samples,) = glob.glob(str(tmp_path / "out" / "**" / "samples_stdlib_choice_*.jsonl"), recursive=True)
    through_server = json.loads(Path(results).read_text())["results"]["stdlib_choice"]
    in_process = model_class()(model, tokenizer, batch_size=4)
    right = 0
    for line in Path(samples).read_text().splitlines():
        sample = json.loads(line)
        args = [sample["arguments"][f"gen_args_{i}"] for i in range(len(sample["arguments"]))]
        want = in_process.loglikelihood([SimpleNamespace(args=(a["arg_0"], a["arg_1"])) for a in args])
        got = [float(r[0][0]) for r in sample["resps"]]  # the log-likelihood the server's log-probabilities gave
        assert len(got) == len(want) == len(DOCS[sample["doc_id"]]["choices"])
        assert all(abs(ll - mine) < 1e-4 for ll, (mine, _) in zip(got, want))
        right += max(range(len(want)), key=lambda i: want[i][0]) == int(sample["target"])
    assert through_server["acc,none"] == pytest.approx(right / len(DOCS))


def test_an_echoed_text_prompt_and_its_continuation_read_as_one_text(served):
    server, folder, model, tokenizer = served
    prompt = "import os\nimport sys\n\n\ndef main():\n    return"
    status, r = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 8, "echo": True, "logprobs": 1,
                                                "temperature": 0})
    assert status == 200, r
    status, alone = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0})
    ids = tokenizer.encode(prompt)
    generated = r["choices"][0]["logprobs"]["tokens"][len(ids) :]
    text, lp = r["choices"][0]["text"], r["choices"][0]["logprobs"]
    # The continuation keeps the space the model generated after the prompt ("return" + " x"), and every token's
    # text sits at its offset in the returned text.
    continuation = text[len(prompt) :]
    assert text.startswith(prompt) and continuation == "".join(generated) and continuation.startswith(" ")
    assert alone["choices"][0]["text"] == continuation[1:]  # alone, a completion drops the space it starts with
    assert all(text[o : o + len(t)] == t for o, t in zip(lp["text_offset"], lp["tokens"]))
    assert "".join(lp["tokens"]) == text and len(generated) == r["usage"]["completion_tokens"]
