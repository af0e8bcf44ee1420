"""Every bad input a user can feed the CLI, in one table: one line on stderr naming the problem, exit code 1, no
traceback, nothing written, and the input folder byte-identical afterwards.

Each row builds its bad input from a good tiny model folder (a random OpenELM with a trained SentencePiece
tokenizer) and runs the real console script.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import sentencepiece as spm
from spm_util import train_spm
from tiny import tiny_args

from mlx_openelm import random_model, save
from mlx_openelm.tokenizer import Tokenizer

SCRIPT = str(Path(sys.executable).with_name("mlx-openelm"))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A converted model folder that works, its tokenizer and a second model with another vocabulary."""
    root = tmp_path_factory.mktemp("good")
    spm_path = train_spm(root / "spm")
    vocab = Tokenizer.from_file(spm_path).vocab_size
    model = save(random_model(tiny_args(vocab_size=vocab), dtype="float32"), root / "model")
    shutil.copy(spm_path, model / "tokenizer.model")
    other = save(random_model(tiny_args(vocab_size=vocab + 64), dtype="float32"), root / "other")
    shutil.copy(spm_path, other / "tokenizer.model")
    return root, model, other


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(good_model: Path, work: Path, name: str = "model") -> Path:
    dest = work / name
    shutil.copytree(good_model, dest)
    return dest


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _unigram(work: Path) -> Path:
    # A valid SentencePiece model whose tokenizer.json (built for BPE) cannot encode like it: the parity check fails.
    model = io.BytesIO()
    text = [f"word{i} thing{i * 7 % 13} other{i % 5}" for i in range(400)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, model_type="unigram",
                                   vocab_size=300, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
                                   byte_fallback=True)
    path = work / "unigram.model"
    path.write_bytes(model.getvalue())
    return path


def _fake_tgz(work: Path, truncated: bool) -> Path:
    path = work / "llama-tokenizer-js-1.2.2.tgz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b'var llama_vocab_base64 = "' + b"QUFB" * 5000 + b'";\n'
        info = tarfile.TarInfo("package/llama-tokenizer.js")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    path.write_bytes(raw[: len(raw) // 2] if truncated else gzip.compress(b"not a tar archive"))
    return path


def _gguf(work: Path) -> Path:
    path = work / "vocab.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\x00" * 5)  # the header stops mid-field
    return path


def _jsonl(work: Path, name: str, lines: list[str]) -> Path:
    path = work / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _batch(work: Path, model: Path, lines: list[str]) -> tuple[list[str], Path]:
    """``batch`` over a p.jsonl of ``lines`` into out.jsonl, and the folder whose bytes must not change."""
    prompts = _jsonl(work, "p.jsonl", lines)
    return ["batch", "-m", str(model), "--input", str(prompts), "--output", str(work / "out.jsonl")], work


CASES = {}  # name -> (build(work, model, other) -> (argv, folder whose bytes must not change), expected message)


def case(name: str, message: str):
    def register(build):
        CASES[name] = (build, message)
        return build

    return register


@case("tokenizer fetch: truncated tgz", "truncated or corrupt")
def _(w, m, o):
    return ["tokenizer", "fetch", "-o", str(m), "--from-file", str(_fake_tgz(w, True))], m


@case("tokenizer fetch: gzip that is no tar", "llama-tokenizer")
def _(w, m, o):
    return ["tokenizer", "fetch", "-o", str(m), "--tokenizer", str(_fake_tgz(w, False))], m


@case("tokenizer fetch: truncated gguf", "truncated or corrupt")
def _(w, m, o):
    return ["tokenizer", "fetch", "-o", str(m), "--tokenizer", str(_gguf(w))], m


@case("tokenizer fetch: parity fails", "unlike SentencePiece")
def _(w, m, o):
    return ["tokenizer", "fetch", "-o", str(m), "--tokenizer", str(_unigram(w))], m


@case("generate: truncated weights", "truncated or corrupt")
def _(w, m, o):
    _truncate(m / "model.safetensors")
    return ["generate", "-m", str(m), "-p", "hi"], m


@case("generate: config not JSON", "not valid JSON")
def _(w, m, o):
    (m / "config.json").write_text("{oops")
    return ["generate", "-m", str(m), "-p", "hi"], m


@case("chat: config lacks a key", "missing required key(s): head_dim")
def _(w, m, o):
    config = json.loads((m / "config.json").read_text())
    del config["head_dim"]
    (m / "config.json").write_text(json.dumps(config))
    return ["chat", "-m", str(m)], m


@case("bench: truncated weights", "truncated")
def _(w, m, o):
    _truncate(m / "model.safetensors", 0.9)
    return ["bench", "--model", str(m), "--trials", "1"], m


@case("chat: template raises at render", "ZeroDivisionError")
def _(w, m, o):
    (w / "t.jinja").write_text("{{ 1 / 0 }}")
    return ["chat", "-m", str(m), "--chat-template", str(w / "t.jinja")], m


@case("generate -n 0, before the weights load", "--max-tokens must be at least 1")
def _(w, m, o):
    _truncate(m / "model.safetensors")  # would be the error if the weights were read first
    return ["generate", "-m", str(m), "-p", "hi", "-n", "0"], m


@case("no tokenizer, before the weights load", "no tokenizer")
def _(w, m, o):
    _truncate(m / "model.safetensors")
    (m / "tokenizer.model").unlink()
    return ["generate", "-m", str(m), "-p", "hi"], m


@case("draft with another vocabulary", "vocabulary of")
def _(w, m, o):
    return ["generate", "-m", str(m), "-p", "hi", "--draft-model", str(o)], m


@case("serve: draft with another vocabulary", "vocabulary of")
def _(w, m, o):
    return ["serve", "-m", str(m), "--draft-model", str(o), "--port", "0"], m


@case("draft and lookup together", "not both")
def _(w, m, o):
    return ["generate", "-m", str(m), "-p", "hi", "--draft-model", str(m), "--prompt-lookup", "2"], m


@case("prompt lookup 0", "prompt_lookup must be")
def _(w, m, o):
    return ["generate", "-m", str(m), "-p", "hi", "--prompt-lookup", "0"], m


@case("serve --max-batch 0", "--max-batch")
def _(w, m, o):
    return ["serve", "-m", str(m), "--max-batch", "0"], m


@case("perplexity: no data file", "no such file")
def _(w, m, o):
    return ["perplexity", "-m", str(m), "--data", str(w / "none.txt")], m


@case("perplexity: empty data", "empty")
def _(w, m, o):
    (w / "empty.txt").write_text("")
    return ["perplexity", "-m", str(m), "--data", str(w / "empty.txt")], m


@case("perplexity: malformed JSONL line", "d.jsonl:2: not valid JSON")
def _(w, m, o):
    return ["perplexity", "-m", str(m), "--data", str(_jsonl(w, "d.jsonl", ['{"text": "a"}', '{"text": "b"']))], m


@case("perplexity: no text field", 'd.jsonl:2: no "text" field')
def _(w, m, o):
    return ["perplexity", "-m", str(m), "--data", str(_jsonl(w, "d.jsonl", ['{"text": "a"}', '{"body": "b"}']))], m


@case("batch: malformed JSONL line", "p.jsonl:2: not valid JSON")
def _(w, m, o):
    return _batch(w, m, ['{"prompt": "a"}', "[1, 2", '{"prompt": "c"}'])


@case("batch: missing prompt", 'p.jsonl:2: needs a "prompt"')
def _(w, m, o):
    return _batch(w, m, ['{"prompt": "a"}', '{"id": 7}'])


@case("batch: bad stop strings", "p.jsonl:2: stop must be")
def _(w, m, o):
    return _batch(w, m, ['{"prompt": "a"}', '{"prompt": "b", "stop": 5}'])


@case("batch: bad repetition penalty", "p.jsonl:1: repetition_penalty must be")
def _(w, m, o):
    return _batch(w, m, ['{"prompt": "a", "repetition_penalty": -1}'])


@case("batch: no input file", "no such file")
def _(w, m, o):
    return ["batch", "-m", str(m), "--input", str(w / "none.jsonl"), "--output", str(w / "out.jsonl")], w


@case("batch: empty input", "holds no prompt")
def _(w, m, o):
    return _batch(w, m, [])


@case("batch: output of another input", "not in")
def _(w, m, o):
    _jsonl(w, "out.jsonl", ['{"id": "zzz", "text": "", "finish_reason": "stop", "prompt_tokens": 2, '
                            '"completion_tokens": 0}'])
    return _batch(w, m, ['{"prompt": "a"}'])


# The input as --output: its last line has no newline, the shape a killed run leaves, which a resume cuts off. The
# check must come before that cut (it used to delete the input's last line, count the rest as done and succeed).
@case("batch: output is the input", "is the input file")
def _(w, m, o):
    prompts = w / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "a"}\n{"id": "b", "prompt": "b"}')
    return ["batch", "-m", str(m), "--input", str(prompts), "--output", str(prompts)], w


@case("batch: output is a copy of the input", "out.jsonl:1 is not a line this command wrote")
def _(w, m, o):
    lines = ['{"id": "a", "prompt": "a"}', '{"id": "b", "prompt": "b"}']
    _jsonl(w, "out.jsonl", lines)
    (w / "out.jsonl").write_text((w / "out.jsonl").read_text()[:-1])  # a partial last line, as a killed run leaves
    return ["batch", "-m", str(m), "--input", str(_jsonl(w, "p.jsonl", lines)), "--output", str(w / "out.jsonl")], w


@case("batch: NaN temperature", "p.jsonl:2: temperature must be a finite number")
def _(w, m, o):
    return _batch(w, m, ['{"prompt": "a"}', '{"prompt": "b", "temperature": NaN}'])


@case("batch: seed beyond 64 bits", "p.jsonl:1: seed must be below 2**64")
def _(w, m, o):
    return _batch(w, m, ['{"prompt": "a", "temperature": 0.5, "seed": 100000000000000000000000}'])


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_touches_nothing(good, tmp_path, name):
    _, model, other = good
    build, message = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    folder = _copy(model, work)
    argv, watched = build(work, folder, other)
    before = _snapshot(watched)
    p = subprocess.run([SCRIPT, *argv], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    assert message in lines[0], lines[0]
    assert _snapshot(watched) == before  # nothing written, nothing changed, no temporary file left
    assert not (work / "out.jsonl").exists() or "out.jsonl" in before
