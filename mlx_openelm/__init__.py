"""mlx-openelm: Apple's OpenELM language models on MLX."""

from .cache import make_cache
from .config import ModelArgs, preset
from .load import load, load_model, random_model, save
from .model import Model

__version__ = "0.1.0"

__all__ = ["Model", "ModelArgs", "load", "load_model", "make_cache", "preset", "random_model", "save", "__version__"]
