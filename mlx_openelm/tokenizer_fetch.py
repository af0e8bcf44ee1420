"""Where a tokenizer comes from: the one of a model folder (:func:`load_tokenizer`), and a ``tokenizer.model`` for
OpenELM, which Apple's repos lack and Meta's copy sits behind a gated account.

Routes, in order: the model's own directory; ``--tokenizer`` (a file, a directory, a downloaded package
artifact, or a Hugging Face repo id, with ``HF_TOKEN``); then a rebuild of Meta's exact file from the
vocabulary in public packages (the user cache, ``npm pack``, ``pip download``). Meta's sha256 is checked;
the rebuilt file is cached, never written into the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from mlx_openelm.fileio import atomic_write, cache_dir, is_repo_id
from mlx_openelm.llama_vocab import META_SHA256, NPM_PACKAGE, PYPI_PACKAGE, rebuild_from_artifact, sha256
from mlx_openelm.tokenizer import INSTRUCT_CHAT_TEMPLATE, Tokenizer
from mlx_openelm.tokenizer_json import model_from_tokenizer_json, write_hf_files

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
HOW_TO_SUPPLY = ("supply it with --tokenizer PATH_OR_REPO (a tokenizer.model, a Hugging Face repo id with HF_TOKEN "
                 "set, or a downloaded llama-tokenizer-js-1.2.2.tgz or llama_cpp_python-0.3.36.tar.gz)")
_NETWORK_ERRORS = re.compile(r"ENOTFOUND|ECONNREFUSED|ECONNRESET|ETIMEDOUT|EAI_AGAIN|ENETUNREACH|NewConnectionError|"
                             r"Max retries exceeded|Temporary failure in name resolution|Network is unreachable|"
                             r"Connection refused|timed out|ProxyError")


class TokenizerUnavailable(ValueError):
    """No route gave a usable ``tokenizer.model``; the message names the routes tried and the fix."""


class RegistryUnreachable(OSError):
    """A package registry could not be reached."""


@dataclass(frozen=True)
class FetchResult:
    """Where the tokenizer came from: ``path`` in the destination, the ``route`` used, its ``sha256``, and a
    ``note`` saying whether it is Meta's file or a custom one."""

    path: Path
    route: str
    sha256: str
    note: str


def _run(cmd: list[str], dest: Path, pattern: str) -> Path:
    # Run a registry client in ``dest`` and return the one file it downloaded there.
    try:
        proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise RegistryUnreachable(f"`{' '.join(cmd[:3])}` timed out") from None
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    if proc.returncode != 0:
        network = next((ln for ln in lines if _NETWORK_ERRORS.search(ln)), None)
        if network:
            raise RegistryUnreachable(f"registry unreachable: {network}")
        raise ValueError(f"`{' '.join(cmd[:3])}` failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    files = sorted(dest.glob(pattern))
    if not files:
        raise ValueError(f"`{' '.join(cmd[:3])}` left no {pattern} in {dest}")
    return files[0]


def download_npm(dest: Path) -> Path:
    """``npm pack llama-tokenizer-js@1.2.2`` into ``dest``; returns the tarball."""
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm not found")
    return _run([npm, "pack", NPM_PACKAGE], Path(dest), "llama-tokenizer-js-*.tgz")


def download_pypi(dest: Path) -> Path:
    """``pip download`` the llama-cpp-python sdist into ``dest``; returns it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PYPI_PACKAGE, "-d", "."]
    return _run(cmd, Path(dest), "llama_cpp_python-*.tar.gz")


def check_model(data: bytes, origin: str) -> str:
    """Accept Meta's file, or a custom SentencePiece model with unk/bos/eos 0/1/2; return a note about it.

    A 32000-piece model claims to be Llama-2's vocabulary, so it must be Meta's file exactly.
    """
    digest = sha256(data)
    if digest == META_SHA256:
        return "Meta's Llama-2 tokenizer.model"
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except RuntimeError:
        raise ValueError(f"{origin} is not a valid SentencePiece model") from None
    if sp.vocab_size() == 32000:
        raise ValueError(f"{origin} has Llama-2's 32000 pieces but sha256 {digest}, not Meta's {META_SHA256} "
                         "(corrupt or modified)")
    ids = (sp.unk_id(), sp.bos_id(), sp.eos_id())
    if ids != (0, 1, 2):
        raise ValueError(f"{origin} has unk/bos/eos ids {ids}; OpenELM needs (0, 1, 2)")
    return f"custom tokenizer ({sp.vocab_size()} pieces), not Meta's"


def _from_user(tokenizer: str) -> tuple[bytes, str]:
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no tokenizer.model in that folder")
    if path.is_file():
        # A downloaded package artifact (tar, GGUF, JS source) is rebuilt; anything else is a tokenizer.model.
        if path.suffix in (".gz", ".tgz", ".gguf", ".js"):
            return rebuild_from_artifact(path), f"rebuilt from {path}"
        return path.read_bytes(), str(path)
    if not is_repo_id(tokenizer):
        raise FileNotFoundError(f"--tokenizer {tokenizer}: no such file, and not a Hugging Face repo id")
    from huggingface_hub import hf_hub_download  # only this route needs the hub client

    try:
        local = hf_hub_download(tokenizer, "tokenizer.model", token=os.environ.get("HF_TOKEN"))
    except Exception as e:  # the hub raises many kinds (gated, missing, offline); all mean this route failed
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--tokenizer {tokenizer}: {first}") from None
    return Path(local).read_bytes(), f"Hugging Face repo {tokenizer}"


def _rebuild(tried: list[str]) -> tuple[bytes, str]:
    cached = cache_dir() / "llama2" / "tokenizer.model"
    if cached.is_file() and sha256(cached.read_bytes()) == META_SHA256:
        return cached.read_bytes(), f"cache {cached}"
    tried.append(f"cache ({'stale' if cached.exists() else 'empty'}: {cached})")
    for name, download in ((f"npm pack {NPM_PACKAGE}", download_npm), (f"pip download {PYPI_PACKAGE}", download_pypi)):
        with tempfile.TemporaryDirectory(prefix="mlx-openelm-") as tmp:
            try:
                data = rebuild_from_artifact(download(Path(tmp)))
            except (OSError, ValueError) as e:
                tried.append(f"{name} ({e})")
                continue
        atomic_write(cached, data)
        return data, f"rebuilt from {name}, cached at {cached}"
    raise ValueError("no tokenizer.model found")


def _find(source_dir: Path | None, tokenizer: str | None, allow_rebuild: bool, tried: list[str]) -> tuple[bytes, str]:
    if source_dir is not None:
        candidate = Path(source_dir) / "tokenizer.model"
        if candidate.is_file():
            tried.append(f"source dir ({candidate})")
            return candidate.read_bytes(), str(candidate)
        tried.append(f"source dir (no tokenizer.model in {source_dir})")
    if tokenizer is not None:
        tried.append(f"--tokenizer {tokenizer}")
        return _from_user(tokenizer)  # asked for explicitly, so its failure is final
    tried.append("--tokenizer (not given)")
    if not allow_rebuild:
        tried.append("rebuild (disabled)")
        raise ValueError("no tokenizer.model found")
    return _rebuild(tried)


def fetch_tokenizer(dest_dir: Path, source_dir: Path | None = None, tokenizer: str | None = None,
                    instruct: bool = False, allow_rebuild: bool = True) -> FetchResult:
    """Like ``ensure_tokenizer``, and say which route was used."""
    tried: list[str] = []
    try:
        data, route = _find(source_dir, tokenizer, allow_rebuild, tried)
        note = check_model(data, route)
    except (OSError, ValueError) as e:
        message = f"{e}; tried: {', '.join(tried)}; {HOW_TO_SUPPLY}"
        raise TokenizerUnavailable(" ".join(message.split("\n"))) from None
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    # The three files are written and checked in a folder of their own first, then moved in: a failed parity
    # check leaves the destination as it was, never a mismatched set.
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=dest_dir))
    try:
        atomic_write(staging / "tokenizer.model", data)
        write_hf_files(staging / "tokenizer.model", staging, INSTRUCT_CHAT_TEMPLATE if instruct else None)
        for name in TOKENIZER_FILES:
            os.chmod(staging / name, 0o644)
            os.replace(staging / name, dest_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return FetchResult(dest_dir / "tokenizer.model", route, sha256(data), note)


def ensure_tokenizer(dest_dir: Path, source_dir: Path | None = None, tokenizer: str | None = None,
                     instruct: bool = False, allow_rebuild: bool = True) -> Path:
    """Put ``tokenizer.model``, ``tokenizer.json`` and ``tokenizer_config.json`` into ``dest_dir``.

    Tries the source directory, then ``tokenizer`` (path, package artifact or repo id), then (if
    ``allow_rebuild``) the cached or freshly rebuilt Meta file. ``instruct`` stores the Instruct chat
    template. Returns ``dest_dir/tokenizer.model``; raises ``TokenizerUnavailable`` with the routes tried.
    """
    return fetch_tokenizer(dest_dir, source_dir, tokenizer, instruct, allow_rebuild).path


def load_tokenizer(model_dir: str | Path, chat_template: str | Path | None = None) -> Tokenizer:
    """Load ``model_dir/tokenizer.model`` with the chat template stored beside it (``tokenizer_config.json``, or
    the ``chat_template.jinja`` newer transformers write).

    ``chat_template``, a path to a Jinja file, overrides the stored template. A folder with ``tokenizer.json``
    but no ``tokenizer.model`` (as ``mlx_lm.fuse`` writes) gets its SentencePiece model rebuilt in memory from it.
    """
    model_dir = Path(model_dir)
    origin = Path(chat_template) if chat_template is not None else model_dir / "tokenizer_config.json"
    template = None
    if chat_template is not None:
        if not origin.is_file():
            raise FileNotFoundError(f"chat template file not found: {origin}")
        template = origin.read_text(encoding="utf-8")
    elif (model_dir / "chat_template.jinja").is_file():
        origin = model_dir / "chat_template.jinja"
        template = origin.read_text(encoding="utf-8")
    elif origin.is_file():
        try:
            template = json.loads(origin.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"{origin} is not a valid tokenizer config ({e}): fetch it again with "
                             "`mlx-openelm tokenizer fetch`") from None
    path = model_dir / "tokenizer.model"
    if not path.is_file() and (model_dir / "tokenizer.json").is_file():
        sp = spm.SentencePieceProcessor(model_proto=model_from_tokenizer_json(model_dir / "tokenizer.json"))
        return Tokenizer(sp, template, str(origin))
    return Tokenizer.from_file(path, template, str(origin))
