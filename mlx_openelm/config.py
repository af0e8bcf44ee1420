"""OpenELM model configuration: the HF ``config.json`` as a dataclass, size presets, layer-wise scaling."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

REQUIRED_KEYS = (
    "num_transformer_layers",
    "model_dim",
    "head_dim",
    "num_query_heads",
    "num_kv_heads",
    "ffn_multipliers",
)


def make_divisible(v: float, divisor: int) -> int:
    """Round ``v`` to a multiple of ``divisor``, never dropping more than 10% (Apple's rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


def _linspace(start: float, stop: float, n: int) -> list[float]:
    # numpy.linspace semantics without numpy: the last point is exactly ``stop``.
    if n == 1:
        return [start]
    step = (stop - start) / (n - 1)
    return [start + i * step for i in range(n - 1)] + [stop]


def layer_wise_scaling(
    num_layers: int,
    model_dim: int,
    head_dim: int,
    num_gqa_groups: int = 4,
    qkv_multipliers: tuple[float, float] = (0.5, 1.0),
    ffn_multipliers: tuple[float, float] = (0.5, 4.0),
) -> dict[str, list]:
    """Per-layer query heads, KV heads and FFN multipliers, exactly as Apple's ``OpenELMConfig`` computes them."""
    qkv_m = [round(v, 2) for v in _linspace(*qkv_multipliers, num_layers)]
    q_heads = [make_divisible(model_dim * m, head_dim * num_gqa_groups) // head_dim for m in qkv_m]
    return {
        "num_query_heads": q_heads,
        "num_kv_heads": [q // num_gqa_groups for q in q_heads],
        "ffn_multipliers": [round(v, 2) for v in _linspace(*ffn_multipliers, num_layers)],
    }


@dataclass(frozen=True)
class ModelArgs:
    """Mirror of an HF OpenELM ``config.json``; per-layer widths are derived once in ``__post_init__``."""

    num_transformer_layers: int
    model_dim: int
    head_dim: int
    num_query_heads: list[int]
    num_kv_heads: list[int]
    ffn_multipliers: list[float]
    model_type: str = "openelm"
    vocab_size: int = 32000
    ffn_dim_divisor: int = 256
    ffn_with_glu: bool = True
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    rope_freq_constant: float = 10000.0
    rope_max_length: int = 4096
    max_context_length: int = 2048
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 1
    eos_token_id: int = 2
    ffn_dims: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_type != "openelm":
            raise ValueError(f"model_type is {self.model_type!r}, expected 'openelm': this is not an OpenELM config")
        n = self.num_transformer_layers
        if n < 1:
            raise ValueError(f"num_transformer_layers must be >= 1, got {n}")
        for name in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            got = len(getattr(self, name))
            if got != n:
                raise ValueError(f"{name} has {got} entries but num_transformer_layers is {n}: give one per layer")
        for i, (q, kv) in enumerate(zip(self.num_query_heads, self.num_kv_heads)):
            if kv < 1 or q % kv:
                raise ValueError(f"layer {i}: {q} query heads is not a multiple of {kv} KV heads")
        for flag in ("ffn_with_glu", "normalize_qk_projections", "share_input_output_layers"):
            if not getattr(self, flag):
                raise ValueError(f"{flag}=false is not supported: every published OpenELM model sets it true")
        dims = [make_divisible(m * self.model_dim, self.ffn_dim_divisor) for m in self.ffn_multipliers]
        object.__setattr__(self, "ffn_dims", dims)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        """Build from a ``config.json`` dict; unknown keys are ignored, missing required keys are named."""
        missing = [k for k in REQUIRED_KEYS if k not in config]
        if missing:
            raise ValueError(f"config is missing required key(s): {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in config.items() if k in names}
        for k in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            kwargs[k] = list(kwargs[k])
        return cls(**kwargs)

    @property
    def max_positions(self) -> int:
        """The most positions the model can place: its RoPE table or its context, whichever is longer (generation
        itself stops at ``max_context_length``; speculative drafts may look past it)."""
        return max(self.max_context_length, self.rope_max_length)

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` fields (derived widths excluded)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


_PRESET_SHAPES = {
    # name: (layers, model_dim, head_dim)
    "OpenELM-270M": (16, 1280, 64),
    "OpenELM-450M": (20, 1536, 64),
    "OpenELM-1_1B": (28, 2048, 64),
    "OpenELM-3B": (36, 3072, 128),
}
PRESETS = tuple(_PRESET_SHAPES)


def preset(name: str, **overrides: Any) -> ModelArgs:
    """The ``ModelArgs`` of a published size (``-Instruct`` accepted), per-layer lists from the scaling rule.

    ``overrides`` replace config fields, e.g. ``vocab_size=256`` for a structure-only model.
    """
    base = name.removeprefix("apple/").removesuffix("-Instruct")
    if base not in _PRESET_SHAPES:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    layers, dim, head_dim = _PRESET_SHAPES[base]
    config = {
        "num_transformer_layers": layers,
        "model_dim": dim,
        "head_dim": head_dim,
        **layer_wise_scaling(layers, dim, head_dim),
    }
    config.update(overrides)
    return ModelArgs.from_dict(config)
