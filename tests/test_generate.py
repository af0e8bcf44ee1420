import io
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from spm_util import train_spm
from tiny import tiny_args

from mlx_openelm import (
    generate,
    generate_step,
    make_cache,
    make_logits_processors,
    make_sampler,
    random_model,
    save,
    stream_generate,
)
from mlx_openelm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_args(), dtype="float32", seed=0)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    path = train_spm(tmp_path_factory.mktemp("spm"), vocab_size=400)
    return path.parent


@pytest.fixture(scope="module")
def tokenizer(spm_dir):
    return Tokenizer.from_file(spm_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def text_model(tokenizer):
    return random_model(tiny_args(vocab_size=tokenizer.vocab_size), dtype="float32", seed=1)


def _prompt(n=8, seed=0, vocab=128):
    return mx.array(np.random.default_rng(seed).integers(3, vocab, n), dtype=mx.uint32)


def _tokens(model, prompt, **kw):
    return [t for t, _ in generate_step(prompt, model, **kw)]


def test_greedy_equals_repeated_argmax_of_full_forward(model):
    prompt = _prompt()
    ours = _tokens(model, prompt, max_tokens=64)
    seq = prompt.tolist()
    for _ in range(64):
        seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1])))
    assert ours == seq[8:]


def test_logprobs_are_normalised_and_match_the_token(model):
    for token, logprobs in generate_step(_prompt(), model, max_tokens=4):
        assert logprobs.shape == (128,)
        assert abs(mx.logsumexp(logprobs).item()) < 1e-5 and int(mx.argmax(logprobs)) == token


def test_chunked_prefill_changes_nothing(model):
    prompt = _prompt(40, seed=2)
    assert _tokens(model, prompt, max_tokens=12, prefill_step_size=7) == _tokens(model, prompt, max_tokens=12)


def test_prompt_cache_continues_a_conversation(model):
    first, more = _prompt(10, seed=3), _prompt(5, seed=4)
    cache = make_cache(model)
    out = _tokens(model, first, max_tokens=6, prompt_cache=cache)
    # The cache holds the prompt and every generated token but the last, which the next prompt starts with.
    assert cache.offset == 10 + 5
    follow = mx.concatenate([mx.array(out[-1:], dtype=mx.uint32), more])
    again = _tokens(model, follow, max_tokens=6, prompt_cache=cache)
    whole = mx.concatenate([first, mx.array(out, dtype=mx.uint32), more])
    assert again == _tokens(model, whole, max_tokens=6)


def test_context_limit_caps_generation_and_rejects_long_prompts():
    small = random_model(tiny_args(max_context_length=32), dtype="float32", seed=0)
    assert len(_tokens(small, _prompt(28), max_tokens=100)) == 4
    with pytest.raises(ValueError, match="the prompt has 32 tokens but the model's context holds 32"):
        _tokens(small, _prompt(32), max_tokens=4)


def test_rotating_cache_matches_within_the_window_and_passes_the_context_limit():
    small = random_model(tiny_args(max_context_length=48), dtype="float32", seed=0)
    prompt = _prompt(8)
    plain = _tokens(small, prompt, max_tokens=40)
    rotated = _tokens(small, prompt, max_tokens=80, max_kv_size=24)
    assert len(rotated) == 80 and all(0 <= t < 128 for t in rotated)
    assert rotated[:16] == plain[:16]  # 8 prompt + 16 generated fill the 24-token window exactly


def test_quantized_kv_cache_stays_close():
    model = random_model(tiny_args(head_dim=32), dtype="float32", seed=0)  # quantization groups of 32
    prompt = _prompt(16, seed=5)
    exact = list(generate_step(prompt, model, max_tokens=16))
    quant = list(generate_step(prompt, model, max_tokens=16, kv_bits=8))
    assert [t for t, _ in quant] == [t for t, _ in exact]
    assert mx.abs(quant[0][1] - exact[0][1]).max().item() < 0.05


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"prefill_step_size": 0}, "prefill_step_size must be an integer >= 1"),
    ({"kv_bits": 3}, "kv_bits must be 4 or 8"),
])
def test_bad_generation_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _tokens(model, _prompt(), **kwargs)


def test_bad_prompts(model, tokenizer):
    with pytest.raises(ValueError, match="1-D"):
        _tokens(model, _prompt()[None], max_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        _tokens(model, mx.array([], dtype=mx.uint32), max_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        generate(model, tokenizer, "")
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        generate(model, tokenizer, "Hello", stop=[""])


def test_streamed_text_equals_decode_and_stats(text_model, tokenizer):
    responses = list(stream_generate(text_model, tokenizer, "The capital of France", max_tokens=48,
                                     sampler=make_sampler(temp=3.0, seed=0)))
    ids = [r.token for r in responses]
    assert "".join(r.text for r in responses) == tokenizer.decode(ids)
    last = responses[-1]
    assert [r.finish_reason for r in responses[:-1]] == [None] * (len(responses) - 1)
    assert last.finish_reason == ("stop" if ids[-1] == tokenizer.eos_id else "length")
    assert last.prompt_tokens == len(tokenizer.encode("The capital of France"))
    assert [r.generation_tokens for r in responses] == list(range(1, len(responses) + 1))
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0


def test_same_seed_same_text(text_model, tokenizer):
    def run(seed):
        return generate(text_model, tokenizer, "Hello", max_tokens=24, sampler=make_sampler(temp=3.0, seed=seed))

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_stop_string_spanning_tokens_is_cut_exactly(text_model, tokenizer):
    def kw():  # a fresh seeded sampler per run: both runs draw the same tokens
        return {"max_tokens": 48, "sampler": make_sampler(temp=3.0, seed=2)}

    responses = list(stream_generate(text_model, tokenizer, "Hello", **kw()))
    segments = [r.text for r in responses]
    full = "".join(segments)
    # A stop string made of the end of one token's text and the start of a later one's.
    j = next(i for i in range(5, len(segments) - 1) if len(segments[i]) >= 2 and segments[i + 1])
    stop = segments[j][-2:] + segments[j + 1][:2]
    cut = list(stream_generate(text_model, tokenizer, "Hello", stop=["never appears", stop], **kw()))
    assert "".join(r.text for r in cut) == full[: full.find(stop)]
    assert cut[-1].finish_reason == "stop" and len(cut) <= j + 2


def test_eos_stops_with_reason_stop(text_model, tokenizer):
    eos = tokenizer.eos_id
    prompt = tokenizer.encode("Hello world")

    def force_eos(history, logits):  # a real logits processor: EOS becomes certain at the 6th token
        if history.size == len(prompt) + 5:
            logits = logits.at[:, eos].add(1e4)
        return logits

    responses = list(stream_generate(text_model, tokenizer, prompt, max_tokens=40, logits_processors=[force_eos]))
    assert len(responses) == 6 and responses[-1].token == eos and responses[-1].finish_reason == "stop"
    ids = [r.token for r in responses]
    assert "".join(r.text for r in responses) == tokenizer.decode(ids)


def test_repetition_penalty_sees_prompt_and_generated_tokens(model):
    prompt = _prompt(6, seed=6)
    processors = make_logits_processors(repetition_penalty=5.0, repetition_context_size=8)
    ours = _tokens(model, prompt, max_tokens=24, logits_processors=processors)
    seq = prompt.tolist()
    for _ in range(24):
        logits = processors[0](mx.array(seq), model(mx.array([seq]))[:, -1])
        seq.append(int(mx.argmax(logits[0])))
    assert ours == seq[6:]
    assert ours != _tokens(model, prompt, max_tokens=24)


def test_greedy_tokens_equal_mlx_lm_on_the_same_directory(tmp_path, text_model, tokenizer, spm_dir):
    import mlx_lm
    from mlx_lm.generate import stream_generate as mlx_lm_stream_generate

    from mlx_openelm.tokenizer_fetch import ensure_tokenizer

    folder = save(text_model, tmp_path / "model")
    ensure_tokenizer(folder, source_dir=spm_dir)
    theirs, their_tokenizer = mlx_lm.load(str(folder))
    prompt = tokenizer.encode("The capital of France is")
    expected = [r.token for r in mlx_lm_stream_generate(theirs, their_tokenizer, prompt, max_tokens=64)]
    ours = [r.token for r in stream_generate(text_model, tokenizer, prompt, max_tokens=64)]
    assert ours == expected and len(ours) > 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, text_model, spm_dir):
    from mlx_openelm.tokenizer_fetch import ensure_tokenizer

    folder = save(text_model, tmp_path_factory.mktemp("cli") / "model")
    ensure_tokenizer(folder, source_dir=spm_dir)
    return folder


def _cli(monkeypatch, capsys, *args, stdin=None):
    import cli

    monkeypatch.setattr(sys, "argv", ["mlx-openelm", "generate", *args])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", stdin)
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_streams_text_and_a_stats_line(monkeypatch, capsys, model_dir, tokenizer):
    code, out, err = _cli(monkeypatch, capsys, "--model", str(model_dir), "--prompt", "Hello", "-n", "12")
    assert code == 0 and out.endswith("\n")
    assert _cli(monkeypatch, capsys, "-m", str(model_dir), "-p", "Hello", "-n", "12", "--no-compile")[1] == out
    assert "prompt:" in err and "tok/s" in err and "peak memory" in err
    code, out, _ = _cli(monkeypatch, capsys, "-m", str(model_dir), "-p", "-", "-n", "12", "--json",
                        stdin=io.StringIO("Hello"))
    record = json.loads(out)
    assert code == 0 and record["prompt_tokens"] == tokenizer.encode("Hello")
    assert record["text"] == tokenizer.decode(record["tokens"]) and len(record["tokens"]) <= 12
    assert record["finish_reason"] in ("stop", "length") and record["generation_tps"] > 0


@pytest.mark.parametrize("args, stdin, message", [
    (["--model", "no/such/dir", "--prompt", "Hi"], None, "no/such/dir has no config.json"),
    (["--prompt", "Hi", "--temp", "-1"], None, "temp must be a number >= 0 (0 = greedy), got -1.0"),
    (["--prompt", "Hi", "--kv-bits", "5"], None, "kv_bits must be 4 or 8, got 5"),
    (["--prompt", ""], None, "the prompt is empty"),
    (["--prompt", "Hello world " * 300], None, "but the model's context holds 512: shorten the prompt"),
    (["--prompt", "-"], "bad-bytes", "cannot read the prompt from stdin"),
])
def test_cli_bad_input_is_one_line_and_exit_1(monkeypatch, capsys, model_dir, args, stdin, message):
    if "--model" not in args:
        args = ["--model", str(model_dir), *args]
    if stdin == "bad-bytes":
        stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe\xfa"), encoding="utf-8")
    code, out, err = _cli(monkeypatch, capsys, *args, stdin=stdin)
    assert code == 1 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_resolve_model_uses_paths_as_given_and_converts_repo_ids_once(tmp_path, monkeypatch, model_dir):
    import huggingface_hub.constants

    from mlx_openelm.hub import resolve_model

    monkeypatch.setenv("MLX_OPENELM_CACHE", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert resolve_model(model_dir) == model_dir
    assert resolve_model("./not/here") == Path("./not/here")  # a path: load reports it missing
    done = tmp_path / "home" / "models" / "apple--OpenELM-270M-Instruct"
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    assert resolve_model("apple/OpenELM-270M-Instruct") == done  # converted before: no conversion
    with pytest.raises(FileNotFoundError, match="someone/absent"):
        resolve_model("someone/absent")  # the converter's own error: offline and not in the hub cache
    assert not (tmp_path / "home" / "models" / "someone--absent").exists()


@pytest.mark.parametrize("simulated_backend", ["cpu", "metal", "cuda"], indirect=True)
def test_prompts_prefill_in_the_backends_chunks(model, monkeypatch, simulated_backend):
    from mlx_openelm import backend
    from mlx_openelm.runner import Forward

    seen, prefill = [], Forward.prefill
    monkeypatch.setattr(Forward, "prefill", lambda self, ids, step, stream: seen.append(step) or prefill(
        self, ids, step, stream))
    _tokens(model, _prompt(20, seed=5), max_tokens=2)
    _tokens(model, _prompt(20, seed=5), max_tokens=2, prefill_step_size=7)
    assert seen == [backend.prefill_chunk(), 7] and seen[0] == (512 if simulated_backend == "cpu" else 2048)
