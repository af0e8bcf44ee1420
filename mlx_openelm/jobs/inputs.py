"""Reading a job's inputs: text and JSONL files, every problem named with the file and the line, before any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".md", ".py", ".text", "")


def data_files(path: str | Path) -> list[Path]:
    """A file, or every ``.txt``/``.md``/``.py``/``.jsonl`` file under a folder (sorted)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES[:-1], ".jsonl"))
    if not files:
        raise ValueError(f"--data {path}: the folder holds no .txt, .md, .py or .jsonl file")
    return files


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line; a line that is not a JSON object is an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        out.append((n, obj))
    return out


def documents(path: str | Path) -> list[tuple[str, str]]:
    """``(where, text)`` of every document: a whole text file, or each ``text`` field of a JSONL file."""
    docs = []
    for file in data_files(path):
        if file.suffix == ".jsonl":
            for n, obj in read_jsonl(file):
                text = obj.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"{file}:{n}: no \"text\" field with a string (a perplexity JSONL line is "
                                     '{"text": "..."})')
                if text:
                    docs.append((f"{file}:{n}", text))
        else:
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{file}: not UTF-8 text ({e})") from None
            if text.strip():
                docs.append((str(file), text))
    if not docs:
        raise ValueError(f"--data {path}: no text to score (the files are empty)")
    return docs
