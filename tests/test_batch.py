"""The batching engine: prompts of different lengths prefilled together in chunks (right-padded rows), from scratch
and from a reused prefix, decode to exactly what each gives alone; a cancelled row leaves without touching the
others."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_openelm import load
from mlx_openelm.batch import BatchEngine, Sequence
from mlx_openelm.cache import PrefixCache
from mlx_openelm.generate import generate_step, stream_generate

TOKENS = 12


@pytest.fixture(scope="module")
def model_and_ids(trained_checkpoint, tmp_path_factory):
    from mlx_openelm.convert import convert

    folder = convert(trained_checkpoint.path, tmp_path_factory.mktemp("batch") / "model", dtype="float32").path
    model, tokenizer = load(folder)
    ids = tokenizer.encode(trained_checkpoint.text)
    return model, tokenizer, [ids[:5], ids[3:26], ids[10:71], ids[:2]]


def _alone(model, tokenizer, ids: list[int]) -> list[int]:
    """The tokens of ``ids`` decoded alone, up to EOS (included) or TOKENS."""
    return [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=TOKENS)]


def _decode(engine: BatchEngine, seqs: list[Sequence]) -> list[list[int]]:
    """Decode every sequence to its end (a row's first step feeds its last prompt token)."""
    out = {seq: [] for seq in seqs}
    while engine.running:
        for seq, _ in engine.decode():
            out[seq].append(seq.last)
    return [out[seq] for seq in seqs]


@pytest.mark.parametrize("chunk", [1, 8, 512])
def test_prompts_prefilled_together_decode_as_alone(model_and_ids, chunk):
    model, tokenizer, prompts = model_and_ids
    engine = BatchEngine(model)
    seqs = [Sequence(tokenizer, ids, TOKENS) for ids in prompts]
    for seq in seqs:
        engine.add(seq)
    passes = 0
    while engine.prefilling:
        engine.prefill(chunk)
        passes += 1
    assert passes == max(1, -(-max(len(ids) - 1 for ids in prompts) // chunk))
    assert engine.cache.positions == sorted((len(ids) - 1 for ids in prompts), key=lambda n: -(-n // chunk))
    assert _decode(engine, seqs) == [_alone(model, tokenizer, ids) for ids in prompts]


def test_a_reused_prefix_prefills_only_the_rest(model_and_ids):
    model, tokenizer, prompts = model_and_ids
    long = prompts[2]
    prefixes = PrefixCache(1 << 30)
    engine = BatchEngine(model, prefixes)
    first = Sequence(tokenizer, long[:40], TOKENS)
    engine.add(first)
    engine.prefill(512)
    _decode(engine, [first])  # a finished sequence leaves its cache behind
    assert len(prefixes) == 1
    seqs = [Sequence(tokenizer, long, TOKENS), Sequence(tokenizer, prompts[1], TOKENS)]
    for seq in seqs:
        engine.add(seq)
    common = next(i for i, (a, b) in enumerate(zip([*first.history, -1], long)) if a != b)
    assert seqs[0].reused == common >= 39 and seqs[0].prefill_left == len(long) - 1 - common
    engine.prefill(512)
    assert _decode(engine, seqs) == [_alone(model, tokenizer, ids) for ids in (long, prompts[1])]


def test_a_cancelled_sequence_leaves_and_the_others_finish_as_alone(model_and_ids):
    model, tokenizer, prompts = model_and_ids
    engine = BatchEngine(model)
    seqs = [Sequence(tokenizer, ids, TOKENS) for ids in prompts[:3]]
    for seq in seqs:
        engine.add(seq)
    engine.prefill(512)
    engine.decode()
    seqs[1].cancel()
    events = engine.decode()
    assert (seqs[1], "") in events and seqs[1].finish_reason == "cancelled" and seqs[1] not in engine.running
    assert engine.cache.rows == 2
    out = _decode(engine, [seqs[0], seqs[2]])
    assert out == [_alone(model, tokenizer, ids)[2:] for ids in (prompts[0], prompts[2])]


def test_token_id_sequences_need_no_tokenizer_and_end_at_their_budget(model_and_ids):
    model, tokenizer, prompts = model_and_ids
    engine = BatchEngine(model)
    seq = Sequence(None, prompts[2], 5)
    engine.add(seq)
    engine.prefill(512)
    texts = [text for s, text in engine.decode() + engine.decode() + engine.decode() + engine.decode()]
    assert seq.finish_reason is None and texts == [""] * 4
    engine.decode()
    assert seq.finish_reason == "length" and not engine.running and seq.generated == 5
    assert seq.tokens == [t for t, _ in generate_step(mx.array(prompts[2]), model, max_tokens=5)]
