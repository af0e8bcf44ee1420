"""mlx-openelm: Apple's OpenELM language models on MLX."""

__version__ = "0.1.0"  # first: the converter, imported below, reads it

from .cache import make_cache
from .config import ModelArgs, preset
from .generate import GenerationResponse, generate, generate_step, stream_generate
from .hub import load
from .load import load_model, save
from .model import Model
from .random_weights import random_model
from .sample import make_logits_processors, make_sampler

__all__ = [
    "GenerationResponse", "Model", "ModelArgs", "generate", "generate_step", "load", "load_model", "make_cache",
    "make_logits_processors", "make_sampler", "preset", "random_model", "save", "stream_generate", "__version__",
]
