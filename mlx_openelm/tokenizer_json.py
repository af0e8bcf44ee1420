"""Write the Hugging Face files (``tokenizer.json``, ``tokenizer_config.json``) for a SentencePiece model.

mlx-lm and transformers load tokenizers from these files. They are built here from the ``tokenizer.model``
in the layout of Meta's own Llama-2 ``tokenizer.json`` (a BPE model whose merges are ranked by piece
score, a Prepend/Replace normalizer, byte fallback, BOS added by the post-processor), then checked to
encode exactly like SentencePiece.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import sentencepiece as spm

from mlx_openelm.fileio import atomic_write

SPACE = "\u2581"
_BYTE = re.compile(r"<0x[0-9A-F]{2}>")

# Strings the parity check runs after writing: the cases where tokenizers most often differ.
PROBES = (
    "Hello world", " Hello world", "  two leading spaces", "The capital of France is", "a ,b", "",
    " ", "   ", "\n", "\t\n \n", "trailing   ", "don't stop", "1234567890 3.14", "🦙 llamas 👍🏽",
    "東京は日本の首都です。", "Crème brûlée, naïve café", "def f(x):\n    return x ** 2\n",
    "<|user|>\nhi</s>\n<|assistant|>\n", "<s>a</s>b<unk>", "\u0000\u00ff\ufffd",
)


def merges_from_model(sp: spm.SentencePieceProcessor) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's encoder: every split of a normal piece into two normal
    pieces, ranked by the merged piece's score (higher merges first), then by the ids of the parts."""
    normal = {sp.id_to_piece(i): i for i in range(sp.vocab_size()) if _is_normal(sp, i)}
    merges = []
    for piece, i in normal.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = sorted((s for s in splits if s[0] in normal and s[1] in normal),
                        key=lambda s: (normal[s[0]], normal[s[1]]))
        merges += [(sp.get_score(i), left, right) for left, right in splits]
    merges.sort(key=lambda m: -m[0])  # stable: equal scores keep id order
    return [(left, right) for _, left, right in merges]


def tokenizer_json(sp: spm.SentencePieceProcessor) -> dict:
    """The ``tokenizer.json`` content for ``sp``."""
    specials = sorted(i for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()) if i >= 0)
    bos = sp.id_to_piece(sp.bos_id())
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": sp.id_to_piece(i), "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for i in specials],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPACE},
            {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
        ]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [sp.bos_id()], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": sp.id_to_piece(sp.unk_id()),
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
            "byte_fallback": True, "ignore_merges": False,
            "vocab": {sp.id_to_piece(i): i for i in range(sp.vocab_size())},
            "merges": [list(m) for m in merges_from_model(sp)],
        },
    }


def tokenizer_config(sp: spm.SentencePieceProcessor, chat_template: str | None = None) -> dict:
    """The ``tokenizer_config.json`` content: special tokens, BOS on, and the chat template if any."""
    config = {
        # The generic fast class uses tokenizer.json as written; transformers v5's Llama classes rebuild
        # the pipeline and tokenize text that starts with a space differently from SentencePiece.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": sp.id_to_piece(sp.bos_id()),
        "eos_token": sp.id_to_piece(sp.eos_id()),
        "unk_token": sp.id_to_piece(sp.unk_id()),
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def check_parity(tokenizer_json_path: Path, sp: spm.SentencePieceProcessor, texts: tuple[str, ...] = PROBES) -> None:
    """Raise ``ValueError`` naming the first text that ``tokenizer.json`` encodes unlike SentencePiece."""
    from tokenizers import Tokenizer as HFTokenizer  # brought by transformers; only needed for this check

    from mlx_openelm.tokenizer import Tokenizer

    hf, ref = HFTokenizer.from_file(str(tokenizer_json_path)), Tokenizer(sp)
    for text in texts:
        if hf.encode(text).ids != [sp.bos_id()] + ref.encode(text, bos=False):
            raise ValueError(f"{tokenizer_json_path} encodes {text!r} unlike SentencePiece; please report this")


def write_hf_files(model_path: Path, dest_dir: Path, chat_template: str | None = None) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for ``model_path`` into ``dest_dir`` and
    check that the former encodes like SentencePiece."""
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    for name, content in (("tokenizer.json", tokenizer_json(sp)),
                          ("tokenizer_config.json", tokenizer_config(sp, chat_template))):
        atomic_write(dest_dir / name, json.dumps(content, ensure_ascii=False, indent=2))
    check_parity(dest_dir / "tokenizer.json", sp)


def _is_normal(sp: spm.SentencePieceProcessor, i: int) -> bool:
    return not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))


def model_from_tokenizer_json(path: Path) -> bytes:
    """A SentencePiece ``tokenizer.model`` rebuilt from a ``tokenizer.json`` in the layout :func:`tokenizer_json`
    writes (what ``mlx_lm.fuse`` leaves, having no ``tokenizer.model``), checked to encode exactly like it.

    Meta's vocabulary gives back Meta's exact file. Otherwise each merged piece scores minus the rank of its first
    merge, which keeps SentencePiece's merge order, and so its encoding, the same.
    """
    from mlx_openelm.llama_vocab import META_SHA256, build_model_proto, sha256, vocab_from_pieces

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        model = data["model"]
        pieces = [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
        merges = [m if isinstance(m, list) else m.split(" ") for m in model["merges"]]
        specials = {t["content"] for t in data.get("added_tokens", []) if t.get("special")}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a tokenizer.json this project can read ({e!r}); fetch the tokenizer with "
                         "`mlx-openelm tokenizer fetch`") from None
    proto = build_model_proto(*vocab_from_pieces(pieces))
    if sha256(proto) == META_SHA256:
        return proto
    first_merge = {}
    for rank, (left, right) in enumerate(merges):
        first_merge.setdefault(left + right, rank)
    unk = model.get("unk_token")
    types = [2 if p == unk else 3 if p in specials else 6 if _BYTE.fullmatch(p) else 1 for p in pieces]
    scores = [0.0 if t != 1 else -float(first_merge.get(p, len(merges) + i)) for i, (p, t) in enumerate(zip(pieces,
                                                                                                            types))]
    proto = build_model_proto(pieces, scores, types, vocab_size=len(pieces))
    sp = spm.SentencePieceProcessor(model_proto=proto)
    check_parity(Path(path), sp)
    return proto
