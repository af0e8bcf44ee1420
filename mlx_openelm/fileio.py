"""Filesystem helpers shared by the package: atomic writes of a file or a folder, the user cache, repo ids."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename: never a half-written file.

    The file gets the user's umask, as a plain ``open`` would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_existing(target: Path, force: bool = False) -> None:
    """Raise ``FileExistsError`` when ``target`` exists and ``force`` is not set."""
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists: choose another output or pass --force to replace it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove the temporary folders that dead processes left beside ``target`` (an interrupted or killed
    :func:`atomic_directory`); returns what was removed. Folders of live processes are left alone."""
    removed = []
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        pid = tmp.name[len(target.name) + 2 :].split(".", 1)[0]
        if tmp.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def atomic_directory(target: Path, force: bool = False) -> Path:
    """A fresh temporary folder beside ``target`` (named with this process's id, so a later run can tell a dead
    run's leftovers), with the user's umask; move it into place with :func:`commit_directory`."""
    refuse_existing(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: the output would be unreadable to others
    return tmp


def commit_directory(tmp: Path, target: Path) -> None:
    """Replace ``target`` by ``tmp`` (the old output is removed only once the new one is complete)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def cache_dir() -> Path:
    """The user cache (rebuilt tokenizer, models converted on first use): ``$MLX_OPENELM_CACHE``, else
    ``$XDG_CACHE_HOME/mlx-openelm``, else ``~/.cache/mlx-openelm``."""
    if os.environ.get("MLX_OPENELM_CACHE"):
        return Path(os.environ["MLX_OPENELM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mlx-openelm"


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hugging Face repo id (``owner/name``) rather than a path."""
    return not text.startswith((".", "/", "~")) and _REPO_ID.fullmatch(text) is not None
