"""Small filesystem helpers shared by the package: atomic writes, the user cache folder, repo-id detection."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cache_dir() -> Path:
    """The user cache (rebuilt tokenizer, models converted on first use): ``$MLX_OPENELM_CACHE``, else
    ``$XDG_CACHE_HOME/mlx-openelm``, else ``~/.cache/mlx-openelm``."""
    if os.environ.get("MLX_OPENELM_CACHE"):
        return Path(os.environ["MLX_OPENELM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mlx-openelm"


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hugging Face repo id (``owner/name``) rather than a path."""
    return not text.startswith((".", "/", "~")) and _REPO_ID.fullmatch(text) is not None
