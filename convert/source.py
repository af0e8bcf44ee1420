"""Source checkpoints: a local directory or a Hugging Face repo, its ``config.json`` and its tensors.

Tensor headers are read (and checked against the file sizes) without touching the data; each tensor is
then read on its own, so a 12 GB float32 checkpoint never sits in memory whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_openelm.fileio import is_repo_id
from mlx_openelm.tensorfile import FLOAT_DTYPES, TensorInfo, read_safetensors_header

# Apple's HF code keeps rotary tables as non-persistent buffers; an export that saved them anyway is harmless.
ROTARY_BUFFER = re.compile(r"(^|\.)(pos_embedding|inv_freq)(\.|$)")
HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "*.model"]


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index} is not a valid index ({e!r}): download it again") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory / missing[0]} is listed in {index.name} but missing: download it")
        return [directory / n for n in names]
    return sorted(directory.glob("model*.safetensors"))


@dataclass
class Checkpoint:
    """An opened source checkpoint: its directory, a label (repo id or path), config and tensor headers."""

    path: Path
    label: str
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    dropped: list[str] = field(default_factory=list)
    _open: dict[Path, dict[str, mx.array]] = field(default_factory=dict, repr=False)

    def load(self, name: str) -> mx.array:
        """Tensor ``name`` (lazy; evaluating it reads only its own bytes). Each tensor is handed out once."""
        file = self.tensors[name].file
        if file not in self._open:
            self._open[file] = _read_file(file)
        value = self._open[file].pop(name)
        return value if isinstance(value, mx.array) else mx.array(value.float().numpy())  # a torch tensor


def _read_file(file: Path) -> dict:
    if file.suffix == ".bin":
        return _torch_load(file)  # only reached when the user allowed it and torch is importable
    return mx.load(str(file))  # lazy: arrays read their bytes on evaluation


def _bin_tensors(directory: Path, allow_bin: bool) -> dict[str, TensorInfo]:
    files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{directory} has no model.safetensors, model-*.safetensors or pytorch_model.bin")
    if not allow_bin:
        raise ValueError(
            f"{files[0]} is a pickle, which can run code when loaded: use a safetensors checkpoint, "
            "or pass --allow-bin to read it with torch.load(weights_only=True)"
        )
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ValueError(f"--allow-bin reads {files[0].name} with PyTorch, not installed: pip install torch") from None
    tensors = {}
    for file in files:
        for name, t in _torch_load(file).items():
            tensors[name] = TensorInfo(file, "F32" if t.element_size() == 4 else "BF16", tuple(t.shape))
    return tensors


def _torch_load(file: Path) -> dict:
    import torch

    # weights_only refuses arbitrary pickled objects; mmap keeps the tensors on disk until each is read.
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def resolve(source: str | Path, revision: str | None = None, allow_bin: bool = False) -> tuple[Path, str]:
    """A local directory, or a repo id fetched with ``huggingface_hub`` (``HF_TOKEN``, ``HF_HOME`` and
    ``HF_HUB_OFFLINE`` are honoured, the hub cache is used). Returns the directory and a label."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file: give the checkpoint's directory")
        return path, str(source)
    text = str(source)
    if not is_repo_id(text):
        raise FileNotFoundError(f"{source}: no such directory, and not a Hugging Face repo id (owner/name)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub

    patterns = HUB_PATTERNS + (["pytorch_model*.bin", "pytorch_model.bin.index.json"] if allow_bin else [])
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=patterns)), text
    except hub.HFValidationError:
        raise FileNotFoundError(f"{source}: no such directory, and not a valid Hugging Face repo id") from None
    except hub.GatedRepoError:
        raise PermissionError(f"{source} is gated: accept its licence on huggingface.co and set HF_TOKEN") from None
    except hub.RepositoryNotFoundError:
        raise FileNotFoundError(f"{source}: no such repo on the Hugging Face hub (private? set HF_TOKEN)") from None
    except (hub.LocalEntryNotFoundError, hub.IncompleteSnapshotError):
        raise FileNotFoundError(
            f"{source} is not (fully) in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub is unreachable"
        ) from None


def open_checkpoint(source: str | Path, revision: str | None = None, allow_bin: bool = False) -> Checkpoint:
    """Resolve ``source``, read its ``config.json`` (``model_type`` must be ``openelm``) and tensor headers."""
    directory, label = resolve(source, revision, allow_bin)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: point to an OpenELM checkpoint directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("model_type") != "openelm":
        got = config.get("model_type") if isinstance(config, dict) else None
        raise ValueError(f"{config_path} has model_type {got!r}, expected 'openelm': not an OpenELM checkpoint")
    files = _safetensors_files(directory)
    if files:
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in read_safetensors_header(file, FLOAT_DTYPES).items():
                if name in tensors:
                    raise ValueError(f"tensor {name} appears in both {tensors[name].file.name} and {file.name}")
                tensors[name] = info
    else:
        tensors = _bin_tensors(directory, allow_bin)
    dropped = sorted(n for n in tensors if ROTARY_BUFFER.search(n))
    for name in dropped:
        del tensors[name]
    return Checkpoint(directory, label, config, tensors, dropped)
