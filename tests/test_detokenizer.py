"""Streaming detokenizer: the streamed text equals sp.decode, with no U+FFFD from a split character."""

import random

import pytest
from spm_util import HARD_STRINGS, check_streaming_invariant, stream, train_spm

from mlx_openelm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_file(train_spm(tmp_path_factory.mktemp("spm")))


def test_hard_strings_stream_exactly(tok):
    # Characters outside the tiny training corpus are spelled with byte pieces.
    assert any(tok.sp.is_byte(i) for i in tok.encode("🦩 Łódź"))
    check_streaming_invariant(tok, HARD_STRINGS + ["🦩 Łódź", "  \n\n  ", " a ,b"])


def test_incomplete_character_is_held_back_until_complete(tok):
    ids = tok.encode("🦩", bos=False)
    byte_ids = [i for i in ids if tok.sp.is_byte(i)]
    assert len(byte_ids) == 4
    segments = stream(tok, ids)
    assert segments[-2] == "🦩" and all(s in ("", " ") for s in segments[:-2]) and segments[-1] == ""
    # A sequence cut inside a character: flush gives one U+FFFD per dangling byte, as sp.decode does.
    cut = ids[:-1]
    assert "".join(stream(tok, cut)) == tok.sp.decode(cut)
    assert stream(tok, cut)[-1] == "\ufffd" * 3


def test_leading_space_rule_matches_sentencepiece(tok):
    world = tok.sp.piece_to_id("\u2581world")
    assert tok.sp.id_to_piece(world) == "\u2581world"
    assert stream(tok, [tok.bos_id, world, world]) == ["", "world", " world", ""]
    assert "".join(stream(tok, [tok.sp.piece_to_id("\u2581"), world])) == tok.sp.decode(
        [tok.sp.piece_to_id("\u2581"), world]) == " world"


def test_random_id_sequences_match_sp_decode(tok):
    # Any ids, including stray byte pieces, control and unknown ids: same text as sp.decode.
    rng = random.Random(0)
    for _ in range(3000):
        ids = [rng.randrange(tok.vocab_size) if rng.random() < 0.5 else rng.randrange(260)
               for _ in range(rng.randrange(1, 12))]
        assert "".join(stream(tok, ids)) == tok.sp.decode(ids), ids
