"""Generation for a file of prompts: decoded together in batches, resumable, data-parallel under ``mlx.launch``.

Input: one JSON object per line with ``prompt`` (text, completed as is) or ``messages`` (rendered with the
chat template), an optional ``id`` (default: the line number) and optional ``max_tokens``, ``temperature``,
``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``. Output: one JSON object per input, in input order:
``id``, ``text``, ``finish_reason``, ``prompt_tokens``, ``completion_tokens``.

Every input line is checked before any work. The output only ever grows by whole lines, appended in input order
and flushed to disk (``fsync``) after each chunk; a rerun skips the ids already there, so a killed run resumes.
Chunks are shared among ranks (each decodes its part with continuous batching) and rank 0 writes them.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..batch import BatchEngine, Sequence
from ..hub import resolve_model
from ..load import check_folder
from ..sample import make_logits_processors, make_sampler
from ..tokenizer_fetch import load_tokenizer
from .distributed import gather, group
from .inputs import read_jsonl

DEFAULTS = {"max_tokens": 256, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
OPTIONS = {"max_tokens": int, "temperature": (int, float), "top_p": (int, float), "top_k": int, "min_p": (int, float),
           "seed": int, "repetition_penalty": (int, float)}
PREFILL_CHUNK = 512


@dataclass(frozen=True)
class Item:
    """One prompt to generate for."""

    id: Any
    ids: list[int]
    budget: int
    options: dict[str, Any]
    stop: tuple[str, ...]


def read_items(path: str | Path, tokenizer: Any, max_context: int, defaults: dict[str, Any]) -> list[Item]:
    """Every input line as an :class:`Item`; problems are named with the file and the line number."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--input {path}: no such file")
    lines = read_jsonl(path)
    if not lines:
        raise ValueError(f"--input {path}: the file holds no prompt")
    items, seen = [], set()
    for n, obj in lines:
        where = f"{path}:{n}"
        item_id = obj.get("id", n)
        if not isinstance(item_id, (str, int)) or isinstance(item_id, bool) or item_id in seen:
            raise ValueError(f"{where}: id must be a string or an integer, unique in the file; got {item_id!r}")
        seen.add(item_id)
        options = {**defaults}
        for key, kinds in OPTIONS.items():
            if key in obj:
                if isinstance(obj[key], bool) or not isinstance(obj[key], kinds):
                    raise ValueError(f"{where}: {key} must be a number, got {obj[key]!r}")
                options[key] = obj[key]
        stop = obj.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, list | tuple) or not all(isinstance(x, str) and x for x in stop):
            raise ValueError(f"{where}: stop must be a non-empty string or a list of them, got {obj.get('stop')!r}")
        if "messages" in obj:
            messages = obj["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                         for m in messages) or not messages:
                raise ValueError(f'{where}: messages must be a non-empty list of {{"role", "content"}} objects')
            try:
                text = tokenizer.apply_chat_template(messages)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        elif isinstance(obj.get("prompt"), str) and obj["prompt"]:
            text = obj["prompt"]
        else:
            raise ValueError(f'{where}: needs a "prompt" (non-empty text) or "messages"')
        ids = tokenizer.encode(text)
        room = max_context - len(ids)
        if room < 1:
            raise ValueError(f"{where}: the prompt has {len(ids)} tokens, the model's context holds {max_context}")
        if not isinstance(options["max_tokens"], int) or options["max_tokens"] < 1:
            raise ValueError(f"{where}: max_tokens must be an integer >= 1, got {options['max_tokens']!r}")
        try:
            make_sampler(options["temperature"], options["top_p"], options["top_k"], options["min_p"],
                         options.get("seed"))
            make_logits_processors(options.get("repetition_penalty"))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        items.append(Item(item_id, ids, min(options["max_tokens"], room), options, tuple(stop)))
    return items


def check_job(model: str | Path, input_path: str | Path, defaults: dict[str, Any] | None = None) -> Path:
    """Every input line checked against the model's tokenizer and context before its weights load (each problem
    one error naming the line); returns the model's folder."""
    folder = resolve_model(model)
    read_items(input_path, load_tokenizer(folder), check_folder(folder).max_context_length,
               {**DEFAULTS, **(defaults or {})})
    return folder


def done_ids(path: Path) -> list[Any]:
    """The ids already in the output (a trailing partial line, from a killed run, is cut off first)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    ids = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            ids.append(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"--output {path}:{n} is not a line this command wrote: choose another output") from None
    return ids


def decode_items(model: Any, tokenizer: Any, items: list[Item], batch_size: int) -> list[dict[str, Any]]:
    """Results for ``items`` in their order, decoded with continuous batching (``batch_size`` rows at most): each
    group of new prompts is prefilled together, then decoding resumes."""
    engine = BatchEngine(model)
    waiting = deque(enumerate(items))
    results: list[dict | None] = [None] * len(items)
    index, parts = {}, {}
    while waiting or engine.active:
        joining = 0
        while waiting and engine.active < batch_size:
            i, item = waiting.popleft()
            o = item.options
            seq = Sequence(tokenizer, item.ids, item.budget, item.stop,
                           make_sampler(o["temperature"], o["top_p"], o["top_k"], o["min_p"], o.get("seed")),
                           make_logits_processors(o.get("repetition_penalty")))
            index[seq], parts[seq] = (i, item), []
            engine.add(seq)
            joining += 1
        while engine.prefilling:
            engine.prefill(max(64, PREFILL_CHUNK // joining))
        for seq, text in engine.decode():
            parts[seq].append(text)
            if seq.finish_reason:
                i, item = index.pop(seq)
                results[i] = {"id": item.id, "text": "".join(parts.pop(seq)), "finish_reason": seq.finish_reason,
                              "prompt_tokens": len(item.ids), "completion_tokens": seq.generated}
    return results


def batch_generate(model: Any, tokenizer: Any, input_path: str | Path, output_path: str | Path, *,
                   batch_size: int = 8, defaults: dict[str, Any] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Generate for every input line not yet in the output; returns counts (written, skipped, tokens)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    defaults = {**DEFAULTS, **(defaults or {})}
    items = read_items(input_path, tokenizer, model.args.max_context_length, defaults)
    g = group()
    output = Path(output_path).expanduser()
    if output.is_dir() or not output.parent.is_dir():
        raise FileNotFoundError(f"--output {output}: give a file in an existing folder")
    # Rank 0 reads the output; every rank learns what it found, a problem included (so none waits for the others).
    status: dict[str, Any] = {"done": [], "error": None}
    if g.rank() == 0:
        try:
            status["done"] = done_ids(output)
            known = {i.id for i in items}
            stray = [d for d in status["done"] if d not in known]
            if stray:
                raise ValueError(f"--output {output} holds id {stray[0]!r}, which is not in {input_path}: choose "
                                 "another output")
        except (ValueError, OSError) as e:
            status["error"] = str(e)
    status = gather(status, g)[0]
    if status["error"]:
        raise ValueError(status["error"])
    done = status["done"]
    todo = [i for i in items if i.id not in set(done)]
    chunk = batch_size * g.size() * 4
    written = tokens = 0
    mx.reset_peak_memory()
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        mine = decode_items(model, tokenizer, part[g.rank() :: g.size()], batch_size)
        shares = gather(mine, g)
        if g.rank() == 0:
            ordered = [shares[k % g.size()][k // g.size()] for k in range(len(part))]
            with open(output, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
                f.flush()
                os.fsync(f.fileno())
            tokens += sum(r["completion_tokens"] for r in ordered)
        written += len(part)
        if progress:
            progress(written, len(todo))
    return {"written": written, "skipped": len(items) - len(todo), "completion_tokens": tokens, "ranks": g.size(),
            "peak_memory_bytes": mx.get_peak_memory()}
