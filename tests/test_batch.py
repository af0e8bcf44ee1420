"""Continuous batching's prefill: prompts of different lengths advanced together in chunks (right-padded rows), from
scratch and from a reused prefix, decode to exactly what each gives alone."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_openelm import load
from mlx_openelm.batch import BatchDecoder
from mlx_openelm.generate import generate_step

TOKENS = 12


@pytest.fixture(scope="module")
def model_and_ids(trained_checkpoint, tmp_path_factory):
    from mlx_openelm.convert import convert

    folder = convert(trained_checkpoint.path, tmp_path_factory.mktemp("batch") / "model", dtype="float32").path
    model, tokenizer = load(folder)
    ids = tokenizer.encode(trained_checkpoint.text)
    return model, [ids[:5], ids[3:26], ids[10:71], ids[:2]]


def _alone(model, ids: list[int]) -> list[int]:
    return [t for t, _ in generate_step(mx.array(ids), model, max_tokens=TOKENS)]


def _decode(batch: BatchDecoder, pres: list) -> list[list[int]]:
    """Join every prefilled prompt (a row's first step feeds its last prompt token) and decode TOKENS steps."""
    for p in pres:
        batch.join(p)
    out: list[list[int]] = [[] for _ in pres]
    for _ in range(TOKENS):
        for got, token in zip(out, batch.step()):
            got.append(token)
    return out


@pytest.mark.parametrize("chunk", [1, 8, 512])
def test_prompts_prefilled_together_decode_as_alone(model_and_ids, chunk):
    model, prompts = model_and_ids
    batch = BatchDecoder(model)
    pres = [batch.prefill(ids, TOKENS) for ids in prompts]
    passes = 0
    while any(p.remaining for p in pres):
        batch.advance(pres, chunk)
        passes += 1
    assert passes == -(-max(len(ids) - 1 for ids in prompts) // chunk)
    assert [p.done_upto for p in pres] == [len(ids) - 1 for ids in prompts]
    assert _decode(batch, pres) == [_alone(model, ids) for ids in prompts]


def test_a_reused_prefix_prefills_only_the_rest(model_and_ids):
    model, prompts = model_and_ids
    batch = BatchDecoder(model)
    long = prompts[2]
    whole = batch.prefill(long, TOKENS)
    batch.advance([whole], 512)
    prefix = [(k[:, :, :30], v[:, :, :30]) for k, v in zip(whole.keys, whole.values)]
    pres = [batch.prefill(long, TOKENS, prefix), batch.prefill(prompts[1], TOKENS)]
    assert pres[0].remaining == len(long) - 1 - 30
    batch.advance(pres, 512)
    assert _decode(batch, pres) == [_alone(model, ids) for ids in (long, prompts[1])]
