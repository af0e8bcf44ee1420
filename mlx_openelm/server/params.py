"""OpenAI request bodies -> validated generation settings. Every problem is an :class:`ApiError` naming the field.

Every number is checked finite and in range here, on the event loop, so nothing a client sends can raise later on
the scheduler thread, where one request's error would reach the others in its batch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any


class ApiError(Exception):
    """An error the client caused (or a refusal), as an OpenAI error object with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# Fields that would change the result if honoured: refused rather than silently ignored (name -> allowed value).
UNSUPPORTED = {"n": 1, "best_of": 1, "tools": None, "tool_choice": None, "functions": None, "function_call": None,
               "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0, "response_format": None,
               "suffix": None}
MAX_TOP_LOGPROBS = 20  # alternatives reported per token (OpenAI's chat limit; its completions allow 5)
FALSY = (None, False, 0, [], {}, "", "none", "auto", "text")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Settings:
    """One request's generation settings."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float | None
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # None: none reported; N: each token's log-probability and the N most likely
    echo: bool = False  # completions: the prompt comes back first, with its tokens' log-probabilities


INT64_MAX = (1 << 63) - 1


def shown(value: Any) -> str:
    """``value`` for an error message: short, whatever a client sent (a huge integer, a deep list, a long text)."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except RecursionError:
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    """A finite number in ``[low, high]`` (``(low, high]`` when ``low_open``); ``default`` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (isinstance(value, int)
                                                                            or math.isfinite(value))
    if not ok or not (low < value if low_open else low <= value) or value > high:
        raise ApiError(400, f"{name} must be a number {'>' if low_open else '>='} {low:g} and <= {high:g}, got "
                       f"{shown(value)}", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int = INT64_MAX) -> int | None:
    """An integer in ``[low, high]``; None when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer between {low} and {high}, got {shown(value)}", name)
    return value


def _logprobs(body: dict, kind: str) -> int | None:
    """How many alternatives to report per token, or None: completions take ``logprobs`` as that count, chat takes
    ``logprobs: true`` and ``top_logprobs``."""
    if kind == "completion":
        return _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise ApiError(400, f"logprobs must be true or false, got {shown(wanted)}", "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if wanted else None


def settings(body: dict, kind: str = "chat") -> Settings:
    """The generation settings of a chat (``kind="chat"``) or completions (``"completion"``) request body."""
    if kind == "chat" and body.get("echo") not in (None, False):
        raise ApiError(400, "echo is a completions field: this is a chat request", "echo", "unsupported_parameter")
    echo = body.get("echo", False) if kind == "completion" else False
    if not isinstance(echo, bool):
        raise ApiError(400, f"echo must be true or false, got {shown(echo)}", "echo")
    for name, allowed in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != allowed and value not in FALSY:
            raise ApiError(400, f"{name}={shown(value)} is not supported by this server", name,
                           "unsupported_parameter")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    max_tokens = max_tokens if max_tokens is not None else _integer(body, "max_tokens", 0 if echo else 1)
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise ApiError(400, "stop must be a non-empty string or a list of at most 4 of them", "stop")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, f"stream_options.include_usage must be true or false, got {shown(include_usage)}",
                       "stream_options.include_usage")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {shown(stream)}", "stream")
    top_k = _integer(body, "top_k", 0)
    penalty = _number(body, "repetition_penalty", 1.0, 0.0, 1e6, low_open=True)
    return Settings(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=0 if top_k is None else top_k,
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=None if body.get("repetition_penalty") is None else penalty,
        seed=_integer(body, "seed", 0, (1 << 64) - 1),  # what mx.random.key takes
        stop=stops,
        stream=stream,
        include_usage=include_usage,
        logprobs=_logprobs(body, kind),
        echo=echo,
    )


def messages(body: dict) -> list[dict[str, str]]:
    """The ``messages`` of a chat request: a non-empty list of {role, content} with text content."""
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be text", f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return out


def prompts(body: dict) -> list[str | list[int]]:
    """The ``prompt`` of a completions request as a list of prompts: text, token ids, or a list of either."""
    value = body.get("prompt")

    def one(p: Any) -> bool:
        return (isinstance(p, str) and bool(p)) or (isinstance(p, list) and bool(p) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p))

    if one(value):
        return [value]
    if isinstance(value, list) and value and all(one(p) and not isinstance(p, int) for p in value):
        return list(value)
    raise ApiError(400, "prompt must be non-empty text, a list of token ids, or a non-empty list of either",
                   "prompt")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def body_of(raw: bytes, limit: int) -> dict[str, Any]:
    """The JSON object of a request body, at most ``limit`` bytes, whose text is all encodable characters."""
    if len(raw) > limit:
        raise ApiError(413, f"the request body is {len(raw)} bytes, more than this server's limit of {limit}")
    try:
        body = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise ApiError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):  # "\ud800" alone decodes to a character no reply or tokenizer can encode
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "the request body holds a lone UTF-16 surrogate (\\ud800-\\udfff): not text") from None
    return body
