"""Chat sessions: a conversation whose KV cache is kept across turns, so each turn prefills only its new tokens.

The session holds the conversation and its cache, and never prints: ``reply`` yields text pieces and
:class:`Notice` events, and leaves the turn's figures in ``last_turn``. What the user types and sees (slash
commands, their replies) belongs to the terminal front-end, ``chat_terminal.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from .cache import KVCache, make_cache
from .fileio import atomic_write
from .generate import stream_generate

ROLES = ("system", "user", "assistant")
FILE_FORMAT = "mlx-openelm-chat"


@dataclass(frozen=True)
class Notice:
    """Something about the conversation the user should see (not part of the reply)."""

    text: str


@dataclass(frozen=True)
class TurnStats:
    """Figures of one turn: ``prefilled`` of the ``prompt_tokens`` went through the model, the rest came from cache."""

    prompt_tokens: int
    prefilled: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    finish_reason: str  # "stop" (end of sequence), "length" (max tokens or context full), "interrupted"
    peak_memory: float  # GB
    acceptance_rate: float | None = None  # speculative decoding: drafted tokens accepted, and tokens per target pass
    tokens_per_pass: float | None = None

    @property
    def reused(self) -> int:
        """Prompt tokens served from the KV cache kept since the previous turn."""
        return self.prompt_tokens - self.prefilled


class ChatSession:
    """A conversation (``messages``) with a KV cache kept across turns.

    The cache holds ``tokens``; a new turn encodes the whole conversation, keeps the common prefix, trims the cache
    past it and prefills only the rest. When the conversation would leave less than ``min(max_tokens, context //
    2)`` tokens for the reply (context: the model's ``max_context_length``), the oldest turns are dropped (never
    the system prompt).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        system: str | None = None,
        prefill_step_size: int | None = None,
        draft_model: Any = None,
        num_draft_tokens: int = 3,
        prompt_lookup: int | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_context = model.args.max_context_length
        self.prefill_step_size = prefill_step_size
        # Speculative decoding: the draft model's cache is kept in step with the target's, turn after turn.
        self.draft_model, self.num_draft_tokens, self.prompt_lookup = draft_model, num_draft_tokens, prompt_lookup
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.last_turn: TurnStats | None = None
        self._clear_cache()

    @property
    def tokens(self) -> list[int]:
        """The token ids the KV cache holds (the conversation so far, as the model saw it)."""
        return self._ids[: self._cached]

    @property
    def system(self) -> str | None:
        """The system prompt, if any."""
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def reset(self) -> None:
        """Start a new conversation; the system prompt stays (and its cached tokens are reused)."""
        self.messages = self.messages[:1] if self.system is not None else []

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt (``None`` or empty removes it); the next turn re-prefills what changed."""
        rest = self.messages[1:] if self.system is not None else self.messages
        self.messages = ([{"role": "system", "content": text}] if text else []) + rest

    def reply(
        self,
        text: str,
        *,
        max_tokens: int = 256,
        sampler: Callable[[mx.array], mx.array] | None = None,
        logits_processors: list[Callable] | None = None,
    ) -> Iterator[str | Notice]:
        """Add a user message and stream the reply: yields text pieces and :class:`Notice` events.

        Closing the iterator early (e.g. on Ctrl-C) keeps what was generated in the conversation. The turn's
        figures are left in ``last_turn``. Raises ``ValueError`` when the message alone does not fit the context.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        messages = [*self.messages, {"role": "user", "content": text}]
        prompt, ids = self._encode(messages)
        reserve, dropped = min(max_tokens, self.max_context // 2), 0
        while self.max_context - len(ids) < reserve and _drop_oldest_turn(messages):
            dropped += 1
            prompt, ids = self._encode(messages)
        room = self.max_context - len(ids)
        if room < 1:
            raise ValueError(
                f"the message does not fit: {len(ids)} tokens with the system prompt, the context holds "
                f"{self.max_context}; shorten it"
            )
        # Reuse the cached prefix; at least one token must go through the model to get the next-token logits.
        common = min(_common_prefix(ids, self._ids), self._cached, len(ids) - 1)
        stream = stream_generate(
            self.model,
            self.tokenizer,
            ids[common:],
            max_tokens=min(max_tokens, room),
            sampler=sampler,
            logits_processors=logits_processors,
            prompt_cache=self.cache,
            prefill_step_size=self.prefill_step_size,
            **self._speculative(ids[:common]),
        )
        generated: list[int] = []
        pieces: list[str] = []
        last = None
        try:
            self._trim(common)  # inside the try: an interrupt mid-trim is settled below like any other
            if dropped:
                yield Notice(f"context full: dropped the oldest {dropped} turn(s); the system prompt is kept")
            for last in stream:
                if last.token != self.tokenizer.eos_id:
                    generated.append(last.token)
                if last.text:
                    pieces.append(last.text)
                    yield last.text
        finally:
            # Runs on every exit (end, close() on Ctrl-C, exception): the reply so far joins the conversation.
            stream.close()
            reply = "".join(pieces)
            if self.tokenizer.chat_template is None:
                # A base model's reply continues the prompt's text: keep the exact text, a leading space included.
                reply = self.tokenizer.decode(generated, continuation=True)
            self._settle(ids + generated, prompt + reply)
            self.messages = [*messages, {"role": "assistant", "content": reply}]
            self.last_turn = TurnStats(
                prompt_tokens=len(ids),
                prefilled=len(ids) - common,
                prompt_tps=last.prompt_tps if last else 0.0,
                generation_tokens=last.generation_tokens if last else 0,
                generation_tps=last.generation_tps if last else 0.0,
                finish_reason=(last and last.finish_reason) or "interrupted",
                peak_memory=last.peak_memory if last else 0.0,
                acceptance_rate=last.acceptance_rate if last else None,
                tokens_per_pass=last.tokens_per_pass if last else None,
            )

    def save(self, path: str | Path) -> Path:
        """Write the conversation as JSON (atomically: a temporary file beside ``path``, then a rename)."""
        path = Path(path).expanduser()
        record = {"format": FILE_FORMAT, "version": 1, "messages": self.messages}
        try:
            return atomic_write(path, json.dumps(record, ensure_ascii=False, indent=2) + "\n")
        except OSError as e:
            raise OSError(f"cannot write {path}: {e.strerror or e}") from None

    def load(self, path: str | Path) -> None:
        """Replace the conversation by one saved with :meth:`save`; the next turn rebuilds the cache from it."""
        self.messages = read_conversation(path)

    def _encode(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        # The conversation's ids. When the new rendering extends the text the cache stands for, they start with the
        # cached ids exactly as the model saw them (generated tokens as sampled, never re-encoded), followed by the
        # new text's tokens: as a fresh encoding of the whole has them when its tokens do not merge across the old
        # text's end, else the new text encoded on its own. Otherwise (history edited, turns dropped) a fresh
        # encoding of the whole text.
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        full = self.tokenizer.encode(text)
        if not (self._text and text.startswith(self._text)):
            return text, full
        known = self.tokenizer.encode(self._text)
        if full[: len(known)] == known:
            return text, self._ids + full[len(known) :]
        return text, self._ids + self.tokenizer.encode(text[len(self._text) :], bos=False)

    def _speculative(self, cached: list[int]) -> dict[str, Any]:
        if self.draft_model is not None:
            return {"draft_model": self.draft_model, "draft_cache": self.draft_cache,
                    "num_draft_tokens": self.num_draft_tokens}
        if self.prompt_lookup is not None:  # it drafts from the whole conversation, the cached part too
            return {"prompt_lookup": self.prompt_lookup, "num_draft_tokens": self.num_draft_tokens,
                    "context_ids": cached}
        return {}

    def _caches(self) -> list[KVCache]:
        return [self.cache] + ([self.draft_cache] if self.draft_cache is not None else [])

    def _trim(self, n: int) -> None:
        # Keep the first n cached tokens (of those held), in the draft's cache too.
        for c in self._caches():
            if c.offset > n:
                c.trim(c.offset - n)
        self._cached = min(self._cached, n)

    def _settle(self, ids: list[int], text: str) -> None:
        # Record what the caches now hold: the tokens both hold (a cache moves on only after a whole step).
        held = min(c.offset for c in self._caches())
        self._ids, self._text, self._cached = ids, text, held
        self._trim(min(held, len(ids)))

    def _clear_cache(self) -> None:
        self.cache = make_cache(self.model)
        self.draft_cache = make_cache(self.draft_model) if self.draft_model is not None else None
        self._ids: list[int] = []
        self._text = ""
        self._cached = 0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _drop_oldest_turn(messages: list[dict[str, str]]) -> bool:
    """Remove the oldest user turn and its reply (never the system prompt nor the last message); False if none."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    if len(messages) - start < 2:
        return False
    end = start + 1
    while end < len(messages) - 1 and messages[end]["role"] != "user":
        end += 1
    del messages[start:end]
    return True


def read_conversation(path: str | Path) -> list[dict[str, str]]:
    """Messages from a JSON file written by :meth:`ChatSession.save` (or a bare list of role/content messages)."""
    path = Path(path).expanduser()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except OSError as e:
        raise OSError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a saved chat (not JSON: {e})") from None
    messages = record.get("messages") if isinstance(record, dict) else record
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages
    )
    if not ok or any(m["role"] == "system" for m in messages[1:]):
        raise ValueError(
            f"{path} is not a saved chat: expected a list of {{'role': system|user|assistant, 'content': text}} "
            "messages, the system one first"
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]
