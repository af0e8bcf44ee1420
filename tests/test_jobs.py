"""Offline jobs: perplexity against a direct computation, batch generation resumable and exact, both unchanged under
``mlx.launch -n 2`` on localhost (ring backend, bounded in time; its exit code is not trusted, the outputs and each
process's exit status, which it reports, are). Under it, processes that disagree on their input, or one that fails
or hangs, stop every process with a non-zero status instead of a mixed output or a wait without end."""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_openelm import load
from mlx_openelm.jobs.batch_generate import batch_generate
from mlx_openelm.jobs.perplexity import perplexity

SCRIPT = str(Path(sys.executable).with_name("mlx-openelm"))
LAUNCH = str(Path(sys.executable).with_name("mlx.launch"))
FAULTS = str(Path(__file__).with_name("launch_faults.py"))


@pytest.fixture(scope="module")
def folder(trained_checkpoint, tmp_path_factory):
    from mlx_openelm.convert import convert

    return convert(trained_checkpoint.instruct_path, tmp_path_factory.mktemp("jobs") / "model", dtype="float32").path


@pytest.fixture(scope="module")
def data(trained_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "a.txt").write_text(trained_checkpoint.text * 3)
    (root / "b.txt").write_text("def f(x):\n    return x * 2\n" * 20)
    lines = [{"text": trained_checkpoint.text[: 40 + 17 * i]} for i in range(5)]
    (root / "c.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def _direct(model, tokenizer, data: Path, seq_len: int, stride: int) -> tuple[float, int]:
    # Positions 1.. of each document in blocks of ``step`` new tokens; a position in block k is predicted from the
    # tokens of its window: the seq_len tokens that end with that block (fewer at the start).
    total, count = 0.0, 0
    texts = [(data / "a.txt").read_text(), (data / "b.txt").read_text()]
    texts += [json.loads(line)["text"] for line in (data / "c.jsonl").read_text().splitlines()]
    for text in texts:
        ids = tokenizer.encode(text)
        step = min(stride, seq_len - 1)
        for p in range(1, len(ids)):
            block_end = min(1 + ((p - 1) // step + 1) * step, len(ids))
            logits = model(mx.array([ids[max(0, block_end - seq_len) : p]]))[0, -1].astype(mx.float32)
            total -= (logits[ids[p]] - mx.logsumexp(logits)).item()
            count += 1
    return total, count


@pytest.mark.parametrize("seq_len, stride, batch", [(32, None, 4), (32, 7, 3), (64, 48, 1), (16, 1, 8)])
def test_perplexity_equals_a_direct_computation(folder, data, seq_len, stride, batch):
    model, tokenizer = load(folder)
    result = perplexity(model, tokenizer, data, seq_len=seq_len, stride=stride, batch_size=batch)
    total, count = _direct(model, tokenizer, data, seq_len, stride or seq_len)
    assert result.tokens == count and result.documents == 7
    assert abs(result.nll - total / count) <= 1e-4 * total / count and result.ppl == pytest.approx(math.exp(
        total / count), rel=1e-4)


def _launch(*args: str, timeout: float = 180, script: str = SCRIPT, env: dict | None = None) -> \
        subprocess.CompletedProcess:
    # In a session of its own, so that on a timeout the launcher and both processes are killed, not left behind.
    proc = subprocess.Popen([LAUNCH, "-n", "2", "--backend", "ring", "--python", sys.executable, script, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"mlx.launch still ran after {timeout} s:\n{out}{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _exit_codes(p: subprocess.CompletedProcess) -> dict[int, int]:
    # mlx.launch exits 0 whatever its processes did, but reports each one that did not exit 0.
    found = re.findall(r"Node with rank (\d+) (?:exited with code (-?\d+)|(was killed))", p.stdout + p.stderr)
    return {int(rank): int(code) if code else -9 for rank, code, _ in found}


def test_perplexity_under_mlx_launch_is_the_one_process_figure(folder, data, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([SCRIPT, "perplexity", "-m", str(folder), "--data", str(data), "--seq-len", "32", "--stride", "20",
                    "--json", str(one)], check=True, capture_output=True, timeout=120)
    p = _launch("perplexity", "-m", str(folder), "--data", str(data), "--seq-len", "32", "--stride", "20",
                "--json", str(two))
    assert two.is_file(), p.stdout + p.stderr
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["ranks"] == 2 and a["ranks"] == 1
    assert (a["ppl"], a["nll"], a["tokens"], a["windows"]) == (b["ppl"], b["nll"], b["tokens"], b["windows"])


def _prompts(path: Path, trained, n: int, longer: int = 0) -> Path:
    words = trained.text.split()
    lines = []
    for i in range(n):
        if i % 3 == 0:
            lines.append({"id": f"chat-{i}", "messages": [{"role": "user", "content": " ".join(words[: 3 + i % 9])}],
                          "max_tokens": 4 + i % 11 + longer})
        else:
            lines.append({"prompt": " ".join(words[: 2 + i % 13]), "max_tokens": 3 + (5 * i) % 17 + longer})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_batch_output_is_what_each_prompt_gives_alone(folder, trained_checkpoint, tmp_path):
    from mlx_openelm import generate

    model, tokenizer = load(folder)
    prompts = _prompts(tmp_path / "in.jsonl", trained_checkpoint, 24)
    out = tmp_path / "out.jsonl"
    counts = batch_generate(model, tokenizer, prompts, out, batch_size=8)
    assert counts["written"] == 24 and counts["skipped"] == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    inputs = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert [r["id"] for r in results] == [i.get("id", n) for n, i in enumerate(inputs, 1)]
    for r, i in zip(results, inputs):
        text = tokenizer.apply_chat_template(i["messages"]) if "messages" in i else i["prompt"]
        assert r["text"] == generate(model, tokenizer, text, max_tokens=i["max_tokens"]), r
    again = batch_generate(model, tokenizer, prompts, out, batch_size=8)
    assert again["written"] == 0 and again["skipped"] == 24 and len(out.read_text().splitlines()) == 24


def test_batch_under_mlx_launch_is_byte_identical(folder, trained_checkpoint, tmp_path):
    prompts = _prompts(tmp_path / "in.jsonl", trained_checkpoint, 30)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    subprocess.run([SCRIPT, "batch", "-m", str(folder), "--input", str(prompts), "--output", str(one),
                    "--batch-size", "4"], check=True, capture_output=True, timeout=120)
    p = _launch("batch", "-m", str(folder), "--input", str(prompts), "--output", str(two), "--batch-size", "4")
    assert two.is_file(), p.stdout + p.stderr
    assert two.read_bytes() == one.read_bytes() and len(one.read_text().splitlines()) == 30


def test_a_killed_batch_run_resumes_with_every_id_once(folder, trained_checkpoint, tmp_path):
    prompts = _prompts(tmp_path / "in.jsonl", trained_checkpoint, 48, longer=60)  # slow enough to kill mid-way
    reference, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    cmd = [SCRIPT, "batch", "-m", str(folder), "--input", str(prompts), "--batch-size", "2"]
    subprocess.run([*cmd, "--output", str(reference)], check=True, capture_output=True, timeout=180)
    proc = subprocess.Popen([*cmd, "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 8):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    partial = len(out.read_text().splitlines())
    assert 8 <= partial < 48, "the run must be killed part-way"
    subprocess.run([*cmd, "--output", str(out)], check=True, capture_output=True, timeout=180)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 48
    assert out.read_bytes() == reference.read_bytes()


def test_a_second_run_on_the_same_output_is_refused(folder, trained_checkpoint, tmp_path):
    # Another run holds the output (its lock is the output file's own): this one stops before writing anything,
    # where two runs used to append the same ids twice.
    model, tokenizer = load(folder)
    prompts = _prompts(tmp_path / "in.jsonl", trained_checkpoint, 3)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"")
    with open(out, "a+b") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="being written by another run"):
            batch_generate(model, tokenizer, prompts, out, batch_size=2)
    assert out.read_bytes() == b""
    assert batch_generate(model, tokenizer, prompts, out, batch_size=2)["written"] == 3  # the lock went with it


def test_processes_with_different_inputs_stop_before_any_work(folder, trained_checkpoint, tmp_path):
    _prompts(tmp_path / "in0.jsonl", trained_checkpoint, 6)
    _prompts(tmp_path / "in1.jsonl", trained_checkpoint, 6, longer=1)
    out = tmp_path / "out.jsonl"
    p = _launch("none", "0", "batch", "-m", str(folder), "--input", str(tmp_path / "in{rank}.jsonl"), "--output",
                str(out), "--batch-size", "2", script=FAULTS, timeout=120)
    lines = [line for line in (p.stdout + p.stderr).splitlines() if "differ in their input, model or settings" in line]
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), p.stdout + p.stderr
    codes = _exit_codes(p)  # 1, or SIGTERM's -15 when the launcher stopped a process after it had said so
    assert codes.keys() == {0, 1} and 0 not in codes.values(), p.stdout + p.stderr
    assert not out.exists()


def test_a_process_that_fails_mid_job_stops_every_process(folder, trained_checkpoint, tmp_path):
    # Process 1 raises in its second chunk: process 0 learns it at that chunk's exchange and stops with one line
    # naming it, instead of waiting (or being killed by the launcher with nothing said). The first chunk is kept.
    prompts = _prompts(tmp_path / "in.jsonl", trained_checkpoint, 12)
    out = tmp_path / "out.jsonl"
    p = _launch("raise", "1", "batch", "-m", str(folder), "--input", str(prompts), "--output", str(out),
                "--batch-size", "1", script=FAULTS, timeout=120)
    text = p.stdout + p.stderr
    assert "error: process 1 of 2 failed at chunk 2: RuntimeError: injected failure in process 1" in text, text
    codes = _exit_codes(p)
    assert codes.keys() == {0, 1} and 0 not in codes.values(), text
    assert len(out.read_text().splitlines()) == 8  # chunk 1: batch size 1 x 2 processes x 4


def test_a_process_that_hangs_ends_the_others_in_bounded_time(folder, trained_checkpoint, tmp_path):
    # Process 1 never finishes its second chunk and never exits: process 0's watchdog ends its wait at that chunk's
    # collective after MLX_OPENELM_COLLECTIVE_TIMEOUT seconds (a wait without end before), then the launcher stops
    # process 1.
    prompts = _prompts(tmp_path / "in.jsonl", trained_checkpoint, 12)
    tic = time.monotonic()
    p = _launch("hang", "1", "batch", "-m", str(folder), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                "--batch-size", "1", script=FAULTS, timeout=45, env={"MLX_OPENELM_COLLECTIVE_TIMEOUT": "3"})
    text = p.stdout + p.stderr
    assert "error: waited 3 s for the other processes at chunk 2" in text, text
    codes = _exit_codes(p)
    assert codes.get(0) == 1 and codes.get(1, 0) != 0, text
    assert time.monotonic() - tic < 40
