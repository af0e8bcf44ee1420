"""OpenELM's tokenizer: Llama-2's SentencePiece model, a streaming detokenizer and the chat template.

Acquiring Meta's ``tokenizer.model`` (it is not in Apple's repos) lives in ``tokenizer_fetch.py``.
"""

from __future__ import annotations

import codecs
import functools
import re
from pathlib import Path

import jinja2
import sentencepiece as spm
from jinja2.sandbox import ImmutableSandboxedEnvironment

# No official template exists for OpenELM-Instruct (an unanswered question on CoreNet's tracker). This is the
# zephyr-style format of CoreNet's instruction-tuning recipe, the only Apple artifact that shows one.
# ``<|user|>`` etc. are plain text; ``eos_token`` is ``</s>``, which ``Tokenizer.encode`` turns into id 2.
# It starts with ``bos_token`` because mlx-lm and transformers encode a rendered chat without adding BOS.
INSTRUCT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ eos_token ~ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Completion format for base models, which were never trained on a chat format: the conversation is one text the
# model continues. This goes before each message but the first, except a reply (see ``_completion_prompt``).
COMPLETION_SEPARATOR = "\n\n"


def _replace_one_byte(err: UnicodeDecodeError) -> tuple[str, int]:
    # sp.decode turns every invalid byte into one U+FFFD; Python's "replace" may fold several into one.
    return "\ufffd", err.start + 1


@functools.cache
def _error_handler() -> str:
    # Registered on first use, not at import: importing the library changes no global state.
    codecs.register_error("mlx_openelm.spm_replace", _replace_one_byte)
    return "mlx_openelm.spm_replace"


class Tokenizer:
    """A SentencePiece tokenizer with OpenELM's conventions (BOS prepended, EOS ends generation), its
    streaming detokenizer and its chat template (``None``: plain completion prompts)."""

    def __init__(self, sp: spm.SentencePieceProcessor, chat_template: str | None = None,
                 template_origin: str = "chat_template"):
        self.sp = sp
        self.chat_template = chat_template
        specials = [i for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()) if i >= 0]
        self._special_ids = {sp.id_to_piece(i): i for i in specials}
        self._special_re = re.compile("|".join(re.escape(p) for p in self._special_ids))
        self._template = _compile_template(chat_template, template_origin) if chat_template else None
        self._template_origin = template_origin
        if self._template is not None:  # a template that cannot render fails now, before any model loads
            self.apply_chat_template([{"role": "user", "content": "Hello"}])
        self._piece_bytes: list[bytes] | None = None

    @classmethod
    def from_file(cls, path: str | Path, chat_template: str | None = None,
                  template_origin: str = "chat_template") -> Tokenizer:
        """Load a ``tokenizer.model``; a missing or corrupt file raises with the path and the fix.

        ``chat_template`` is a Jinja source; ``template_origin`` names where it came from in errors.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}: run `mlx-openelm tokenizer fetch -o {path.parent}`")
        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path} is not a valid SentencePiece model ({first}); fetch it again with "
                             "`mlx-openelm tokenizer fetch`") from None
        if sp.bos_id() < 0 or sp.eos_id() < 0:
            raise ValueError(f"{path} has no BOS or EOS piece (bos_id={sp.bos_id()}, eos_id={sp.eos_id()})")
        return cls(sp, chat_template, template_origin)

    @property
    def bos_id(self) -> int:
        """Id of ``<s>`` (1 for Llama-2), prepended by ``encode``."""
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        """Id of ``</s>`` (2 for Llama-2), which ends generation."""
        return self.sp.eos_id()

    @property
    def vocab_size(self) -> int:
        """Number of pieces (32000 for Llama-2)."""
        return self.sp.vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of ``text``, with BOS first unless ``bos`` is False or the text starts with ``<s>``.

        SentencePiece reads ``</s>`` in text as ordinary characters, but a rendered chat template writes the
        EOS token as the literal text ``</s>``. Like Meta's ``tokenizer.json``, the literal special pieces
        (``<unk>``, ``<s>``, ``</s>``) become their ids and each stretch between them is encoded on its own
        (with SentencePiece's dummy space prefix).
        """
        ids = [self.bos_id] if bos and not text.startswith(self.sp.id_to_piece(self.bos_id)) else []
        start = 0
        for m in self._special_re.finditer(text):
            ids += self.sp.encode(text[start : m.start()])
            ids.append(self._special_ids[m.group()])
            start = m.end()
        return ids + self.sp.encode(text[start:])

    def decode(self, ids: list[int], continuation: bool = False) -> str:
        """Text of ``ids``, exactly as SentencePiece decodes it (control ids vanish).

        ``continuation``: the ids follow earlier text (a base model's reply), so the first piece keeps the
        leading space that SentencePiece drops at the start of a text ("▁Paris" after "is" is " Paris").
        """
        if not continuation:
            return self.sp.decode(list(ids))
        detokenizer = self.detokenizer(continuation=True)
        return "".join(detokenizer.add(i) for i in ids) + detokenizer.flush()

    def detokenizer(self, continuation: bool = False) -> StreamingDetokenizer:
        """A fresh streaming detokenizer for one generated sequence (``continuation``: as in :meth:`decode`)."""
        if self._piece_bytes is None:
            self._piece_bytes = [_piece_bytes(self.sp, i) for i in range(self.vocab_size)]
        return StreamingDetokenizer(self._piece_bytes, self.sp, continuation)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ({"role", "content"} dicts) as a prompt.

        With a template (Instruct models, or a user file) it is rendered with Jinja as in transformers.
        The Instruct template writes ``<s>``, then per message ``<|role|>``, a newline, the content, ``</s>``
        and a newline, and last (``add_generation_prompt``) ``<|assistant|>`` and a newline.
        Without one (base models) the prompt is the text the model continues, no role markers: a single
        message is passed through unchanged, as a plain completion prompt; see ``_completion_prompt``.
        """
        if self._template is None:
            return _completion_prompt(messages)
        try:
            text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.sp.id_to_piece(self.bos_id),
                                         eos_token=self.sp.id_to_piece(self.eos_id))
        except Exception as e:  # a user's template can raise anything (TemplateError, ZeroDivisionError, ...)
            raise ValueError(f"the chat template in {self._template_origin} failed to render "
                             f"({type(e).__name__}: {e}): fix the template") from None
        if not isinstance(text, str):
            raise ValueError(f"the chat template in {self._template_origin} did not render text")
        return text


class StreamingDetokenizer:
    """Turns token ids into text one id at a time, O(1) work per token.

    Byte-fallback pieces are assembled by an incremental UTF-8 decoder that holds back incomplete
    characters; like ``sp.decode``, the first non-control piece loses one leading space.
    ``"".join(add(i) for i in ids) + flush() == sp.decode(ids)``.
    """

    def __init__(self, piece_bytes: list[bytes], sp: spm.SentencePieceProcessor, continuation: bool = False):
        self._bytes = piece_bytes
        self._sp = sp
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=_error_handler())
        self._at_start = not continuation  # text that continues other text keeps its leading space

    def add(self, token_id: int) -> str:
        """Feed one id; return the text it completes (possibly "")."""
        data = self._bytes[token_id]
        if not data:  # a control id: like sp.decode, it ends a run of byte pieces
            return self._decoder.decode(b"", final=True)
        if self._at_start:
            self._at_start = False
            if data[:1] == b" " and not (self._sp.is_byte(token_id) or self._sp.is_unknown(token_id)):
                data = data[1:]
        return self._decoder.decode(data)

    def flush(self) -> str:
        """Return what is held back at the end (an incomplete character becomes U+FFFD per byte)."""
        return self._decoder.decode(b"", final=True)


def _completion_prompt(messages: list[dict]) -> str:
    """A conversation as one text for a base model: each message's content, with ``COMPLETION_SEPARATOR`` before
    each one but the first, except before a reply (an ``assistant`` message).

    A reply is what the model generated right after the text before it, so nothing goes between them; a reply
    the model generated is therefore kept as its exact text (``Tokenizer.decode(ids, continuation=True)``). Then
    a prompt plus its reply is the start of the next turn's prompt, as the model saw it. Without a template there
    is no cue for the reply to come (the model just continues): ``add_generation_prompt`` changes nothing.
    """
    return "".join(m["content"] if i == 0 or m["role"] == "assistant" else COMPLETION_SEPARATOR + m["content"]
                   for i, m in enumerate(messages))


def _piece_bytes(sp: spm.SentencePieceProcessor, i: int) -> bytes:
    if sp.is_control(i):
        return b""
    if sp.is_byte(i):
        return bytes([int(sp.id_to_piece(i)[1:-1], 16)])
    if sp.is_unknown(i):
        return sp.decode([i]).encode()
    return sp.id_to_piece(i).replace("\u2581", " ").encode()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _compile_template(source: str, origin: str) -> jinja2.Template:
    # The same environment transformers uses, so a template renders the same here and there.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"bad chat template in {origin}: line {e.lineno}: {e.message}") from None
