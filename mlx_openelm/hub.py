"""Models by name: a converted folder, or a Hugging Face repo id converted on first use into the user cache.

This sits after the converter and the loader in the data flow (it calls both); neither imports it.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from .convert import convert
from .fileio import cache_dir, is_repo_id
from .load import check_folder, load_model, read_config
from .model import Model
from .tokenizer import Tokenizer
from .tokenizer_fetch import load_tokenizer


def resolve_model(name: str | Path) -> Path:
    """A converted model folder for ``name``: a local path as is, or for a Hugging Face repo id
    (``apple/OpenELM-270M-Instruct``) its conversion in the user cache (:func:`~mlx_openelm.fileio.cache_dir`),
    made on first use."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists() or not is_repo_id(text):
        return path
    target = cache_dir() / "models" / text.replace("/", "--")
    if not (target / "config.json").is_file():
        convert(text, target, force=target.exists())
    return target


def load(path: str | Path, dtype: str | mx.Dtype | None = "auto", chat_template: str | Path | None = None,
         adapter_path: str | Path | None = None) -> tuple[Model, Tokenizer]:
    """``model, tokenizer = load(path)`` for a converted model directory, or a Hugging Face repo id (converted on
    first use, see :func:`resolve_model`); ``dtype`` and ``adapter_path`` as for
    :func:`~mlx_openelm.load.load_model`. The folder and the tokenizer are checked before the weights load."""
    folder = resolve_model(path)
    read_config(folder)  # cheap checks first (the folder, its config, the tokenizer): no weights read yet
    tokenizer = load_tokenizer(folder, chat_template=chat_template)
    check_folder(folder)
    return load_model(folder, dtype=dtype, adapter_path=adapter_path), tokenizer


def load_draft(draft: str | Path, target: str | Path) -> Model:
    """The draft model for speculative decoding with ``target``: its vocabulary is checked against the target's
    from both configs, before either model's weights load."""
    folder, target_folder = resolve_model(draft), resolve_model(target)
    theirs, ours = check_folder(folder).vocab_size, check_folder(target_folder).vocab_size
    if theirs != ours:
        raise ValueError(f"--draft-model {draft} has a vocabulary of {theirs} tokens and the model {ours}: a draft "
                         "must share the model's tokenizer (OpenELM-270M drafts for every OpenELM size)")
    return load_model(folder, dtype="auto")
