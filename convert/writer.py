"""Streaming safetensors writer: the layout is planned up front, then tensors are written one at a time.

``mx.save_safetensors`` needs every tensor of a shard in memory at once; a converter that streams cannot
afford that. Every output tensor's name, dtype and shape is known before the first one is computed, so
each shard's header is written first and each tensor's bytes are appended as soon as it exists.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import mlx.core as mx

SAFETENSORS_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32"}
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor: its name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        """Bytes of this tensor's data."""
        return math.prod(self.shape) * self.dtype.size


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group ``specs`` in order into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: list[TensorSpec]) -> bytes:
    entries: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for s in specs:
        entries[s.name] = {
            "dtype": SAFETENSORS_DTYPES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to an 8-byte boundary
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """Write the planned tensors, in plan order, into ``model.safetensors`` or ``model-0000i-of-0000n``
    shards plus ``model.safetensors.index.json`` (mlx-lm's names, read by ``mlx_lm.load`` and ours)."""

    def __init__(self, directory: Path, specs: list[TensorSpec], max_shard_bytes: int):
        self.directory = Path(directory)
        self.shards = plan_shards(specs, max_shard_bytes)
        n = len(self.shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)] if n > 1 else ["model.safetensors"]
        self._queue = [(i, s) for i, shard in enumerate(self.shards) for s in shard]
        self._next = 0
        self._shard = -1
        self._fh: BinaryIO | None = None

    def write(self, name: str, array: mx.array) -> None:
        """Append ``array`` as tensor ``name``; it must be the next planned tensor, with the planned shape."""
        shard, spec = self._queue[self._next]
        if name != spec.name or tuple(array.shape) != spec.shape or array.dtype != spec.dtype:
            raise RuntimeError(
                f"writer expected {spec.name} {spec.shape} {spec.dtype}, got {name} {tuple(array.shape)} {array.dtype}"
            )
        if shard != self._shard:
            self._open(shard)
        mx.eval(array)
        self._fh.write(memoryview(array))
        self._next += 1

    def _open(self, shard: int) -> None:
        self._close_file()
        self._shard = shard
        self._fh = open(self.directory / self.files[shard], "wb")  # closed by close() or abort()
        self._fh.write(_header(self.shards[shard]))

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        """Finish the last shard and write the index; every planned tensor must have been written."""
        self._close_file()
        if self._next != len(self._queue):
            raise RuntimeError(f"writer closed after {self._next} of {len(self._queue)} tensors")
        weight_map = {s.name: self.files[i] for i, s in self._queue}
        index = {
            "metadata": {"total_size": sum(s.nbytes for _, s in self._queue)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=4) + "\n")

    def abort(self) -> None:
        """Close any open file without completing (the caller removes the directory)."""
        self._close_file()
