"""Affine weight quantization, layer by layer, and the OpenELM-aware mixed-precision recipes.

The record written to ``config.json`` is mlx-lm's: ``{"group_size", "bits", "mode"}`` plus, per module path,
a dict for a module whose settings differ from those and ``false`` for one left unquantized, so
``mlx_lm.load`` and ``mlx_openelm.load`` rebuild the same layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx

from .writer import TensorSpec

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_BITS = 4
MODE = "affine"
# name: (body bits, bits of the sensitive modules). Modelled on llama.cpp's Q4_K_M: the tied embedding /
# output head always gets the high bits; so do the layers' V projection (inside qkv_proj here, OpenELM fuses
# Q, K and V) and FFN down projection (proj_2) in the first and last eighth of the layers and every third
# layer between them.
RECIPES = {"mixed_2_6": (2, 6), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6), "mixed_4_8": (4, 8)}
EMBEDDING = "transformer.token_embeddings"
_SENSITIVE = re.compile(r"transformer\.layers\.(\d+)\.(attn\.qkv_proj|ffn\.proj_2)")


def _more_bits(layer: int, n_layers: int) -> bool:
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def recipe_bits(path: str, n_layers: int, low: int, high: int) -> int:
    """The bits the mixed recipe gives module ``path`` of an ``n_layers`` model."""
    if path == EMBEDDING:
        return high
    m = _SENSITIVE.fullmatch(path)
    return high if m and _more_bits(int(m[1]), n_layers) else low


@dataclass(frozen=True)
class QuantPlan:
    """Which modules are quantized, with which settings, and which stay in float (width not divisible)."""

    group_size: int
    bits: int
    params: dict[str, dict]
    skipped: list[str]

    def record(self) -> dict:
        """The mlx-lm ``quantization`` record for ``config.json``."""
        record: dict = {"group_size": self.group_size, "bits": self.bits, "mode": MODE}
        for path, p in self.params.items():
            if p["bits"] != self.bits or p["group_size"] != self.group_size:
                record[path] = dict(p)
        record.update({path: False for path in self.skipped})
        return record


def check_settings(bits: int | None, group_size: int, recipe: str | None) -> int:
    """Validate the quantization settings; returns the body bits (``recipe``'s low bits, or ``bits``, or 4)."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"unsupported group size {group_size}; choose one of {', '.join(map(str, GROUP_SIZES))}")
    if recipe is not None:
        if recipe not in RECIPES:
            raise ValueError(f"unknown quantization recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        low, high = RECIPES[recipe]
        if bits is not None and bits != low:
            raise ValueError(f"--q-recipe {recipe} quantizes the body to {low} bits: drop --q-bits {bits}")
        bits = low
    bits = DEFAULT_BITS if bits is None else bits
    if bits not in BITS:
        raise ValueError(f"unsupported bits {bits}; choose one of {', '.join(map(str, BITS))}")
    return bits


def plan_quantization(
    widths: dict[str, int], n_layers: int, bits: int | None, group_size: int, recipe: str | None
) -> QuantPlan:
    """Plan the quantization of the modules in ``widths`` (module path -> input width).

    ``recipe`` (one of :data:`RECIPES`) sets the bits per module; otherwise every module gets ``bits``.
    A module whose input width is not a multiple of ``group_size`` stays unquantized and is listed.
    """
    bits = check_settings(bits, group_size, recipe)
    params, skipped = {}, []
    for path, width in widths.items():
        if width % group_size:
            skipped.append(path)
            continue
        b = recipe_bits(path, n_layers, *RECIPES[recipe]) if recipe else bits
        params[path] = {"group_size": group_size, "bits": b, "mode": MODE}
    return QuantPlan(group_size, bits, params, sorted(skipped))


def quantized_specs(path: str, shape: tuple[int, ...], p: dict, dtype: mx.Dtype) -> list[TensorSpec]:
    """The tensors ``mx.quantize`` makes of a ``shape`` weight: packed ``weight``, ``scales``, ``biases``."""
    rows, width = shape
    groups = (rows, width // p["group_size"])
    return [
        TensorSpec(f"{path}.weight", (rows, width * p["bits"] // 32), mx.uint32),
        TensorSpec(f"{path}.scales", groups, dtype),
        TensorSpec(f"{path}.biases", groups, dtype),
    ]


def quantize_weight(path: str, weight: mx.array, p: dict) -> list[tuple[str, mx.array]]:
    """Quantize one (already cast) weight; the tensors in :func:`quantized_specs` order."""
    wq, scales, biases = mx.quantize(weight, group_size=p["group_size"], bits=p["bits"], mode=MODE)
    return [(f"{path}.weight", wq), (f"{path}.scales", scales), (f"{path}.biases", biases)]
