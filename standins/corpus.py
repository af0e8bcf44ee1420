"""The stand-ins' corpus: the running Python's own standard library, read at run time, never copied into the repo.

Code documents are the standard library's ``.py`` files (code, docstrings, comments), prose documents the
language reference in ``pydoc_data/topics.py`` (one per topic). Left out: test suites, ``site-packages``, the
``encodings`` charmap tables and the build-specific ``_sysconfigdata`` module. The split is fixed by name: a
document is held out (never trained on) when the sha256 of its name falls in one sixteenth of the range, so
the same files are held out on every Python version that has them. Another version has other files: its
corpus has another sha256, which :func:`describe` reports so that scripts can say so.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "__pycache__",
                 "_bundled"}
TOPICS = "pydoc_data/topics.py"
HELD_OUT_ONE_IN = 16


@dataclass(frozen=True)
class Document:
    """One corpus document: ``name`` (a path relative to the standard library, or ``topics/KEY``) and text."""

    name: str
    text: str

    @property
    def held_out(self) -> bool:
        """Whether this document is in the evaluation split (a fixed function of its name)."""
        return int(hashlib.sha256(self.name.encode()).hexdigest()[:8], 16) % HELD_OUT_ONE_IN == 0

    @property
    def is_code(self) -> bool:
        """A Python source file (the rest are prose topics)."""
        return not self.name.startswith("topics/")


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _code_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS & set(rel.parts[:-1]) or rel.as_posix() == TOPICS:
            continue
        if rel.parts[0].startswith(("config-", "_sysconfigdata")) or rel.name.startswith("_sysconfigdata"):
            continue
        files.append(path)
    return files


def _topics(root: Path) -> dict[str, str]:
    # The module is one assignment of a dict literal; read it without importing it.
    tree = ast.parse((root / TOPICS).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "topics":
            return ast.literal_eval(node.value)
    raise ValueError(f"{root / TOPICS} has no topics dict")


def documents(root: Path | None = None) -> list[Document]:
    """Every corpus document in a fixed order: code files sorted by path, then topics sorted by key."""
    root = root or stdlib_root()
    docs = []
    for path in _code_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            docs.append(Document(path.relative_to(root).as_posix(), text))
    docs += [Document(f"topics/{key}", text) for key, text in sorted(_topics(root).items()) if text.strip()]
    return docs


def digest(docs: list[Document]) -> str:
    """sha256 over every document's name and text, in order."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()


def split(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """``(train, held_out)``."""
    return [d for d in docs if not d.held_out], [d for d in docs if d.held_out]


def describe(docs: list[Document]) -> dict:
    """What a script records about the corpus: counts, bytes and sha256 of each split."""
    train, held = split(docs)
    return {
        "python_stdlib": str(stdlib_root()),
        "documents": len(docs),
        "sha256": digest(docs),
        "train": {"documents": len(train), "bytes": sum(len(d.text.encode()) for d in train), "sha256": digest(train)},
        "held_out": {"documents": len(held), "bytes": sum(len(d.text.encode()) for d in held), "sha256": digest(held),
                     "names": [d.name for d in held]},
    }


def write_documents(docs: list[Document], folder: Path) -> Path:
    """Each document as a text file in ``folder`` (for ``mlx-openelm perplexity --data folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for d in docs:
        (folder / (d.name.replace("/", "__") + ".txt")).write_text(d.text, encoding="utf-8")
    return folder


def sample(docs: list[Document], chars: int) -> str:
    """The first ``chars`` characters of the documents' texts, in order (a small, fixed piece of a split)."""
    return "".join(d.text for d in docs)[:chars]
