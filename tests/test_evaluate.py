"""`mlx-openelm eval`: lm-evaluation-harness on the stand-in target. Every log-likelihood equals an independent sum
over the model's forward pass, a rolling log-likelihood equals the perplexity job's total, and the command's
accuracy on a task written here equals the one computed from those sums."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest

from mlx_openelm import load, stream_generate
from mlx_openelm.evaluate import model_class, published_for, results_table
from mlx_openelm.jobs.perplexity import perplexity

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "standins" / "openelm-stdlib-target"
DOCS = [
    {"question": "import os\nimport", "choices": ["sys", "banana", "the"], "label": 0},
    {"question": "def main():\n   ", "choices": ["return", "elephant"], "label": 0},
    {"question": "for i in", "choices": ["range(10):", "purple rain"], "label": 1},
    {"question": "class Stack:\n    def push(self,", "choices": ["x):", "y", "value):\n        pass"], "label": 2},
    {"question": "if __name__ ==", "choices": ["'__main__':", "42"], "label": 0},
    {"question": "try:\n    pass\nexcept", "choices": ["ValueError:", "Exception as e:", "banana"], "label": 1},
]
TASK = """task: stdlib_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def target():
    return load(TARGET, dtype="float32")


def _independent(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | BOS + context) from one unbatched forward pass of the whole text."""
    head = tokenizer.encode(context) if context else [tokenizer.bos_id]
    whole = tokenizer.encode(context + continuation) if context else head + tokenizer.encode(continuation, bos=False)
    logits = model(mx.array(whole[:-1])[None])[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = [logprobs[p - 1, whole[p]].item() for p in range(len(head), len(whole))]
    greedy = all(mx.argmax(logits[p - 1]).item() == whole[p] for p in range(len(head), len(whole)))
    return math.fsum(picked), greedy


def test_loglikelihoods_equal_an_independent_forward_pass(target):
    model, tokenizer = target
    pairs = [("import os\nimport", " sys"), ("", "def main():"), ("x = 1\n", "y = 2"),
             ("for i in range(10):\n    print(i)\n", "\n"), ("a trailing space ", "matters")]
    lm = model_class()(model, tokenizer, batch_size=2)  # batches of two: padding and reordering are exercised
    got = lm.loglikelihood([SimpleNamespace(args=p) for p in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        # The harness's rule: a context's trailing whitespace belongs to the continuation.
        context, continuation = context.rstrip(), context[len(context.rstrip()) :] + continuation
        want, want_greedy = _independent(model, tokenizer, context, continuation)
        assert abs(logprob - want) < 1e-4 and greedy == want_greedy


def test_rolling_loglikelihood_is_the_perplexity_jobs_total(target, tmp_path):
    model, tokenizer = target
    text = (REPO / "standins" / "corpus.py").read_text()[:1500]
    (tmp_path / "doc.txt").write_text(text)
    result = perplexity(model, tokenizer, tmp_path / "doc.txt", seq_len=model.args.max_context_length)
    assert result.windows == 1  # one window: both score every token after BOS with all that precedes it
    (rolling,) = model_class()(model, tokenizer).loglikelihood_rolling([SimpleNamespace(args=(text,))])
    assert abs(rolling + result.nll * result.tokens) < 1e-3


def test_generate_until_stops_where_plain_generation_does(target):
    model, tokenizer = target
    prompts = ["class Stack:\n    def push(self, x):\n", "def main():\n    "]
    lm = model_class()(model, tokenizer, batch_size=2)
    got = lm.generate_until([SimpleNamespace(args=(p, {"until": ["\n\n"], "max_gen_toks": 40})) for p in prompts])
    want = ["".join(r.text for r in stream_generate(model, tokenizer, p, max_tokens=40, stop=["\n\n"]))
            for p in prompts]
    assert got == want and all(got)


def test_the_eval_command_scores_a_local_task_as_those_sums(target, tmp_path):
    model, tokenizer = target
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "stdlib_choice.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    p = subprocess.run([sys.executable, "-c", "from cli import main; main()", "eval", "-m", str(TARGET), "--tasks",
                        "stdlib_choice", "--include-path", str(tmp_path / "tasks"), "--batch-size", "4", "--dtype",
                        "float32", "--output", str(tmp_path / "out.json")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    measured = json.loads((tmp_path / "out.json").read_text())["results"]["stdlib_choice"]
    acc = norm = 0
    for d in DOCS:  # the harness's multiple choice: " " + choice after the question; acc_norm divides by characters
        lls = [_independent(model, tokenizer, d["question"], " " + c)[0] for c in d["choices"]]
        acc += max(range(len(lls)), key=lambda i: lls[i]) == d["label"]
        norm += max(range(len(lls)), key=lambda i: lls[i] / len(d["choices"][i])) == d["label"]
    assert measured["acc,none"] == pytest.approx(acc / len(DOCS)) and 0 < acc < len(DOCS)
    assert measured["acc_norm,none"] == pytest.approx(norm / len(DOCS))
    assert "stdlib_choice" in p.stdout and f"{100 * acc / len(DOCS):.2f}" in p.stdout


def test_unknown_tasks_are_one_line_before_the_model_loads(tmp_path):
    p = subprocess.run([sys.executable, "-c", "from cli import main; main()", "eval", "-m", str(tmp_path / "none"),
                        "--tasks", "arc_easy,no_such_task"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        p.stderr.strip().splitlines()[-1]] and "unknown task(s): no_such_task" in p.stderr


def test_apples_published_figures_sit_beside_the_measured_ones():
    assert published_for("apple/OpenELM-270M")["hellaswag"] == 46.71
    assert published_for("models/OpenELM-3B-Instruct-4bit")["winogrande"] == 66.85
    assert published_for("standins/openelm-stdlib-target") == {}
    results = {"results": {"hellaswag": {"acc,none": 0.361, "acc_norm,none": 0.4523}}}
    assert results_table(results, "apple/OpenELM-270M")[1] == [["hellaswag", "36.10", "45.23", "46.71"]]


def test_a_quantized_folder_scores_close_to_its_float_weights(target, tmp_path):
    from mlx_openelm.convert import convert

    model, tokenizer = target
    folder = convert(TARGET, tmp_path / "q8", quantize=True, q_bits=8).path
    quantized, _ = load(folder)
    pairs = [SimpleNamespace(args=(d["question"], " " + c)) for d in DOCS for c in d["choices"]]
    full = model_class()(model, tokenizer).loglikelihood(pairs)
    eight = model_class()(quantized, tokenizer).loglikelihood(pairs)
    assert all(math.isfinite(q) and abs(q - f) < 0.05 * abs(f) + 0.1 for (q, _), (f, _) in zip(eight, full))
    assert eight != full  # the 8-bit weights really were used
