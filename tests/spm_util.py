"""Train a tiny LLaMA-style SentencePiece model for tests (no download, well under a second)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import sentencepiece as spm

_CORPUS = """\
The capital of France is Paris. Hello world! Hello, world.
def main(argv: list[str]) -> int:
    return 0  # exit code
for i in range(10): print(i * 2, end=" ")
Öffnungszeiten: Mo–Fr 9:00–18:00. Crème brûlée, naïve café, señor, São Paulo.
東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.
Emoji: 🦙 🚀 👍🏽 ❤️ — and numbers 1234567890, 3.14159, 2**32 = 4294967296.
Пример текста на русском языке. Ελληνικά κείμενα. العربية نص.
   leading spaces, trailing spaces   , tabs\tand\nnewlines\n\n
"""


def train_spm(out_dir: Path, vocab_size: int = 512, text: str | None = None) -> Path:
    """Train a BPE SentencePiece model with Meta's LLaMA settings and return its ``tokenizer.model`` path.

    Byte fallback, split digits, identity normalizer with a dummy prefix, whitespace-only pieces allowed,
    unk/bos/eos = 0/1/2 and no pad piece, as in Llama-2's file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = (text or _CORPUS * 4).splitlines()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


# Strings where tokenizers and detokenizers most often go wrong.
HARD_STRINGS = [
    "Hello world", " leading space", "   three leading spaces", "a ,b", "a  ,  b", "trailing spaces   ",
    "东京是日本的首都。北京は中国の首都です。", "서울은 한국의 수도입니다.", "🦙🦒🦩 llamas, giraffes 👍🏽👨‍👩‍👧",
    "Crème brûlée, naïve café, Ångström, Łódź, ǅemal", "def f(x):\n\tif x:\n\t\treturn {'k': [1, 2]}\n",
    "\n\n\nthree newlines", "spaces    \n    and\n\n  newlines  ", "mixed 中文 and English 🚀 with émojis",
    "ÿ\u0301\u200b\u00a0zero-width and combining", "1234567890 3.14159 -42e-7", "",
]

_WORDS = ("the of and to in is you that it was for on are as with his they at be this have from or one had by "
          "word but not what all were we when your can said there use each which she do how their if will up "
          "def return import class self print while lambda None True yield async await").split()
_CHARS = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|")
          + list("éèêàçñöüßÆøåłžčřğşıİ東京日本語中文한국어русскийΕλληνικάالعربيةहिन्दी")
          + ["🦙", "🚀", "👍🏽", "❤️", "😀", "🇫🇷", "\u200b", "\u00a0", "\r\n", "\t", "\n", "\u2581", "ǅ", "🦒"])


def varied_strings(n: int, seed: int = 0) -> list[str]:
    """``n`` random strings mixing words, code, unicode, emoji and runs of spaces, tabs and newlines."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randrange(1, 12)):
            r = rng.random()
            if r < 0.45:
                parts.append(rng.choice(_WORDS))
            elif r < 0.8:
                parts.append("".join(rng.choice(_CHARS) for _ in range(rng.randrange(1, 6))))
            else:
                parts.append(rng.choice([" ", "\n", "\t"]) * rng.randrange(1, 9))
        out.append(" " * rng.randrange(0, 4) + rng.choice([" ", "", "  ", "\n"]).join(parts))
    return out


def stream(tok, ids: list[int]) -> list[str]:
    """The segments a ``Tokenizer``'s detokenizer returns for ``ids``, the flush last."""
    detok = tok.detokenizer()
    return [detok.add(i) for i in ids] + [detok.flush()]


def check_streaming_invariant(tok, texts: list[str]) -> None:
    """For each text: streamed segments join to sp.decode(ids), and no segment holds a replacement char."""
    for text in texts:
        ids = tok.encode(text) + [tok.eos_id]
        segments = stream(tok, ids)
        assert "".join(segments) == tok.sp.decode(ids) == text
        assert not any("\ufffd" in s for s in segments), (text, segments)
