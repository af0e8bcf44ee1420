"""Generation for a file of prompts: decoded together in batches, resumable, data-parallel under ``mlx.launch``.

Input: one JSON object per line with ``prompt`` (text, completed as is) or ``messages`` (rendered with the
chat template), an optional ``id`` (default: the line number) and optional ``max_tokens``, ``temperature``,
``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``. Output: one JSON object per input, in input order:
``id``, ``text``, ``finish_reason``, ``prompt_tokens``, ``completion_tokens``.

Every input line is checked before any work. The output only ever grows by whole lines, appended in input order
and flushed to disk (``fsync``) after each chunk; a rerun skips the ids already there, so a killed run resumes.
Before it changes a byte of an existing output, a run checks that every line in it is this command's result for an
id of this input (a partial last line, from a killed run, is then cut off), and it holds an exclusive lock on the
output for its whole run, so a second run on the same output stops at once. Chunks are shared among ranks (each
decodes its part with continuous batching) and rank 0 writes them.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from .. import backend
from ..batch import BatchEngine, Sequence
from ..hub import resolve_model
from ..load import check_folder
from ..sample import make_logits_processors, make_sampler
from ..tokenizer_fetch import load_tokenizer
from .distributed import agree_on_job, digest, exchange, group
from .inputs import read_jsonl

DEFAULTS = {"max_tokens": 256, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
OPTIONS = {"max_tokens": int, "temperature": (int, float), "top_p": (int, float), "top_k": int, "min_p": (int, float),
           "seed": int, "repetition_penalty": (int, float)}
RESULT_KEYS = ("id", "text", "finish_reason", "prompt_tokens", "completion_tokens")  # each output line, in order


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
                if isinstance(obj[key], bool) or not isinstance(obj[key], kinds) or (
                        isinstance(obj[key], float) and not math.isfinite(obj[key])):
                    raise ValueError(f"{where}: {key} must be a finite number, got {obj[key]!r}")
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
        if isinstance(options.get("seed"), int) and options["seed"] >= 1 << 64:  # what mx.random.key takes
            raise ValueError(f"{where}: seed must be below 2**64, got {options['seed']}")
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


def done_ids(path: Path, items: list[Item], input_path: Path) -> tuple[list[Any], int]:
    """The ids already in the output ``path`` and the length of its whole lines (a partial last line, from a killed
    run, is not counted). Reads only: a file that is not this command's output for these ``items`` is refused with
    ``ValueError`` before anything is changed."""
    if input_path.exists() and path.exists() and path.samefile(input_path):
        raise ValueError(f"--output {path} is the input file: choose another output")
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1
    known, ids, seen = {i.id for i in items}, [], set()
    for n, line in enumerate(data[:whole].split(b"\n")[:-1], 1):
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or tuple(obj)[: len(RESULT_KEYS)] != RESULT_KEYS or \
                not isinstance(obj["id"], (str, int)):
            raise ValueError(f"--output {path}:{n} is not a line this command wrote: choose another output")
        if obj["id"] not in known:
            raise ValueError(f"--output {path} holds id {obj['id']!r}, which is not in {input_path}: choose another "
                             "output")
        if obj["id"] in seen:
            raise ValueError(f"--output {path}:{n} repeats id {obj['id']!r}: it was written by two runs at once; "
                             "choose another output")
        seen.add(obj["id"])
        ids.append(obj["id"])
    if data[whole:] and not data[whole:].startswith(b'{"id": '):
        raise ValueError(f"--output {path} ends with a partial line this command did not write: choose another output")
    return ids, whole


def claim_output(path: Path, items: list[Item], input_path: Path) -> tuple[Any, list[Any]]:
    """Open the output for appending, under an exclusive lock held as long as the file stays open; returns the open
    file and the ids already done. Refuses, before changing a byte, an output that is not this command's for these
    items, and an output another run holds."""
    done_ids(path, items, input_path)  # refuse a foreign file before creating or locking anything
    f = open(path, "a+b")  # noqa: SIM115 - held open (and locked) for the whole run
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--output {path} is being written by another run of this command: wait for it to end, "
                             "or choose another output") from None
        ids, whole = done_ids(path, items, input_path)  # again, now that no other run can write it
        f.truncate(whole)  # a partial last line from a killed run
        return f, ids
    except BaseException:
        f.close()
        raise


def decode_items(model: Any, tokenizer: Any, items: list[Item], batch_size: int) -> list[dict[str, Any]]:
    """Results for ``items`` in their order, decoded with continuous batching (``batch_size`` rows at most): each
    group of new prompts is prefilled together, then decoding resumes."""
    engine = BatchEngine(model)
    waiting = deque(enumerate(items))
    results: list[dict | None] = [None] * len(items)
    index, parts = {}, {}
    try:
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
                engine.prefill(max(64, backend.prefill_chunk() // joining))  # 512 a pass on the CPU, 2048 on a GPU
            for seq, text in engine.decode():
                parts[seq].append(text)
                if seq.finish_reason:
                    i, item = index.pop(seq)
                    if seq.error is not None:  # its own sampler or stop logic failed: the job stops, resumable
                        raise ValueError(f"id {item.id!r}: generation failed ({type(seq.error).__name__}: "
                                         f"{seq.error})")
                    results[i] = {"id": item.id, "text": "".join(parts.pop(seq)), "finish_reason": seq.finish_reason,
                                  "prompt_tokens": len(item.ids), "completion_tokens": seq.generated}
    finally:
        engine.close()  # also when a step raises: Metal's wired limit goes back
    return results


def batch_generate(model: Any, tokenizer: Any, input_path: str | Path, output_path: str | Path, *,
                   batch_size: int = 8, defaults: dict[str, Any] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Generate for every input line not yet in the output; returns counts (written, skipped, tokens).

    Under ``mlx.launch`` the processes first check that they have the same input and settings; a process that fails
    at any step makes all of them stop (``distributed.exchange``)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    defaults = {**DEFAULTS, **(defaults or {})}
    input_path, output = Path(input_path).expanduser(), Path(output_path).expanduser()
    g = group()
    job: dict[str, Any] = {}

    def prepare() -> str:
        job["items"] = read_items(input_path, tokenizer, model.args.max_context_length, defaults)
        return digest(input_path.read_bytes(), json.dumps(defaults, sort_keys=True), str(batch_size),
                      repr(model.args), str(tokenizer.vocab_size))

    agree_on_job(prepare, g)
    items: list[Item] = job["items"]

    def open_output() -> list[Any] | None:  # rank 0 writes; every rank learns what is done (or rank 0's problem)
        if g.rank() != 0:
            return None
        if output.is_dir() or not output.parent.is_dir():
            raise FileNotFoundError(f"--output {output}: give a file in an existing folder")
        job["file"], done = claim_output(output, items, input_path)
        return done

    try:
        done = set(exchange(open_output, g, "opening the output")[0])
        todo = [i for i in items if i.id not in done]
        chunk = batch_size * g.size() * 4
        written = tokens = 0
        failed: list[Exception] = []  # rank 0's write error, told to the others at the next exchange
        mx.reset_peak_memory()
        for n, start in enumerate(range(0, len(todo), chunk), 1):
            part = todo[start : start + chunk]

            def work(part: list[Item] = part) -> list[dict[str, Any]]:
                if failed:
                    raise failed[0]
                return decode_items(model, tokenizer, part[g.rank() :: g.size()], batch_size)

            shares = exchange(work, g, f"chunk {n}")
            if g.rank() == 0:
                ordered = [shares[k % g.size()][k // g.size()] for k in range(len(part))]
                try:
                    _append(job["file"], ordered)
                except OSError as e:
                    failed.append(e)
                tokens += sum(r["completion_tokens"] for r in ordered)
            written += len(part)
            if progress:
                progress(written, len(todo))
        exchange(lambda: _raise(failed), g, "the end of the job")
    finally:
        if "file" in job:
            job["file"].close()  # and the lock with it
    return {"written": written, "skipped": len(items) - len(todo), "completion_tokens": tokens, "ranks": g.size(),
            "peak_memory_bytes": mx.get_peak_memory()}


def _append(f: Any, results: list[dict[str, Any]]) -> None:
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results).encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())


def _raise(errors: list[Exception]) -> None:
    if errors:
        raise errors[0]
