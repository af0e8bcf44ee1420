"""Models by name: a converted folder, or a Hugging Face repo id converted on first use into the user cache.

This sits after the converter, the loader and speculative decoding's checks in the data flow (it calls them); none
imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from .convert import convert
from .fileio import cache_dir, is_repo_id
from .load import check_folder, load_model, read_config
from .model import Model
from .speculative import PromptLookup, check_draft
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


def generation_options(model: str | Path, max_tokens: int | None = None, draft_model: str | Path | None = None,
                       num_draft_tokens: int = 3, prompt_lookup: int | None = None) -> dict[str, Any]:
    """Check the options of a generation with ``model`` before its weights load, and return its drafting keywords
    (for ``generate_step`` and ``ChatSession``): the draft model loaded (see :func:`load_draft`), or prompt lookup;
    ``{}`` without either. ``max_tokens`` (when given) is checked here so that a bad one fails before loading."""
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {max_tokens}")
    if draft_model and prompt_lookup is not None:  # names, before check_draft sees any loaded model
        raise ValueError("give --draft-model or --prompt-lookup, not both")
    check_draft(None, None, prompt_lookup, num_draft_tokens)
    if prompt_lookup is not None:
        PromptLookup(prompt_lookup)  # its n-gram size is checked where it is used
        return {"prompt_lookup": prompt_lookup, "num_draft_tokens": num_draft_tokens}
    if draft_model:
        return {"draft_model": load_draft(draft_model, model), "num_draft_tokens": num_draft_tokens}
    return {}
