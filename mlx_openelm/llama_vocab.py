"""Rebuild Meta's Llama-2 ``tokenizer.model`` byte for byte from the MIT-licensed vocabulary in public packages.

Two packages ship the 32000 pieces: llama.cpp's vocab-only GGUF inside the ``llama-cpp-python`` sdist (pieces,
scores, types) and the ``llama-tokenizer-js`` npm tarball (pieces only; Meta's scores follow a rule). With
Meta's trainer and normalizer settings the serialized ModelProto is identical to Meta's file.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
import tarfile
import zlib
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as pb

META_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
NPM_PACKAGE = "llama-tokenizer-js@1.2.2"
PYPI_PACKAGE = "llama-cpp-python==0.3.36"
NPM_MEMBER = "package/llama-tokenizer.js"
GGUF_MEMBER = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"

_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6  # SentencePiece piece types (the GGUF uses the same codes)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_gguf_metadata(data: bytes) -> dict:
    """The key/value metadata of a GGUF file (version 2 or 3); tensors are not read."""
    if data[:4] != b"GGUF":
        raise ValueError("not a GGUF file (bad magic)")
    pos = 4

    def take(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return data[pos - n : pos].decode("utf-8")

    def value(kind: int):
        if kind == 8:
            return string()
        if kind == 9:
            item_kind, n = take("I"), take("Q")
            return [value(item_kind) for _ in range(n)]
        return take(_GGUF_SCALARS[kind])

    version = take("I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    take("Q")  # tensor count
    return {string(): value(take("I")) for _ in range(take("Q"))}


def vocab_from_gguf(data: bytes) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types from a llama.cpp vocab GGUF."""
    meta = read_gguf_metadata(data)
    try:
        return meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]
    except KeyError as e:
        raise ValueError(f"GGUF has no {e.args[0]}") from None


def vocab_from_llama_tokenizer_js(source: str) -> tuple[list[str], list[float], list[int]]:
    """Pieces from llama-tokenizer-js, with the scores and types Meta's file gives them (:func:`vocab_from_pieces`)."""
    m = re.search(r'llama_vocab_base64\s*=\s*"([A-Za-z0-9+/=]+)"', source)
    if m is None:
        raise ValueError("llama_vocab_base64 not found in llama-tokenizer.js")
    return vocab_from_pieces(base64.b64decode(m.group(1)).decode("utf-8").split("\n"))


def vocab_from_pieces(pieces: list[str]) -> tuple[list[str], list[float], list[int]]:
    """Llama-2's pieces in id order with Meta's scores and types: ids 0-258 (``<unk>``, ``<s>``, ``</s>``, 256 byte
    pieces) score 0; the pieces made only of ``▁`` score -1e9; every other id i scores -(i - 259)."""
    scores = [0.0 if i < 259 else -1e9 if set(p) == {"\u2581"} else -float(i - 259) for i, p in enumerate(pieces)]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE] * 256 + [_NORMAL] * (len(pieces) - 259)
    return pieces, scores, types[: len(pieces)]


def build_model_proto(pieces: list[str], scores: list[float], types: list[int], vocab_size: int = 32000) -> bytes:
    """Serialize a ModelProto with Meta's Llama-2 trainer and normalizer settings (``vocab_size`` for another
    vocabulary in the same layout)."""
    m = pb.ModelProto()
    for piece, score, kind in zip(pieces, scores, types, strict=True):
        p = m.pieces.add(piece=piece, score=score)
        if kind != _NORMAL:  # Meta's file leaves the type unset on normal pieces
            p.type = kind
    t = m.trainer_spec
    t.input.append("/large_experiments/theorem/datasets/MERGED/all.test1.merged")
    for name, value in dict(
        model_prefix="spm_model_32k_200M_charcov099995_allowWSO__v2", model_type=pb.TrainerSpec.BPE,
        vocab_size=vocab_size, self_test_sample_size=0, input_format="text", character_coverage=0.99995,
        input_sentence_size=200000000, seed_sentencepiece_size=1000000, shrinking_factor=0.75, num_threads=80,
        num_sub_iterations=2, max_sentence_length=4192, shuffle_input_sentence=True, max_sentencepiece_length=16,
        split_by_unicode_script=True, split_by_whitespace=True, split_by_number=True,
        treat_whitespace_as_suffix=False, split_digits=True, allow_whitespace_only_pieces=True,
        vocabulary_output_piece_score=True, hard_vocab_limit=True, use_all_vocab=False, byte_fallback=True,
        required_chars="", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_surface=" \u2047 ", unk_piece="<unk>",
        bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>", train_extremely_large_corpus=False,
        enable_differential_privacy=False, differential_privacy_noise_level=0.0,
        differential_privacy_clipping_threshold=0,
    ).items():
        setattr(t, name, value)
    n = m.normalizer_spec
    n.name, n.precompiled_charsmap, n.add_dummy_prefix, n.remove_extra_whitespaces = "identity", b"", True, False
    n.normalization_rule_tsv = ""  # set (though empty) in Meta's file: two bytes of its 499,723
    return m.SerializeToString()


def read_members(archive: Path, suffixes: list[str]) -> dict[str, bytes]:
    """The members of a tar archive whose names end with each suffix (one pass; missing ones absent)."""
    found = {}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            for suffix in suffixes:
                if member.isfile() and member.name.endswith(suffix) and suffix not in found:
                    found[suffix] = tar.extractfile(member).read()
    return found


def rebuild_from_artifact(path: Path) -> bytes:
    """Meta's ``tokenizer.model`` rebuilt from a downloaded package artifact, checked against its sha256.

    ``path`` is the npm tarball, the PyPI sdist, or a file from either (the ``.gguf`` or ``llama-tokenizer.js``).
    """
    path = Path(path)
    try:
        vocab = _read_vocab(path)
    except (tarfile.TarError, EOFError, struct.error, KeyError, IndexError, UnicodeDecodeError, zlib.error,
            OverflowError, MemoryError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}): download it again") from None
    model = build_model_proto(*vocab)
    if sha256(model) != META_SHA256:
        raise ValueError(f"the tokenizer rebuilt from {path} has sha256 {sha256(model)}, not Meta's {META_SHA256}")
    return model


def _read_vocab(path: Path) -> tuple[list[str], list[float], list[int]]:
    if tarfile.is_tarfile(path):
        members = read_members(path, [NPM_MEMBER, GGUF_MEMBER])
        if GGUF_MEMBER in members:
            vocab = vocab_from_gguf(members[GGUF_MEMBER])
        elif NPM_MEMBER in members:
            vocab = vocab_from_llama_tokenizer_js(members[NPM_MEMBER].decode("utf-8"))
        else:
            raise ValueError(f"{path} holds neither {GGUF_MEMBER} nor {NPM_MEMBER}")
        return vocab
    data = path.read_bytes()
    return vocab_from_gguf(data) if data[:4] == b"GGUF" else vocab_from_llama_tokenizer_js(data.decode("utf-8"))
