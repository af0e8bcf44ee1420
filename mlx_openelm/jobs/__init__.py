"""Offline jobs over many inputs, data-parallel under ``mlx.launch`` (MLX's own distributed engine):
perplexity over a corpus (``perplexity.py``) and generation for a file of prompts (``batch_generate.py``).
Run alone they use one process; under ``mlx.launch -n N`` each rank takes its share (``distributed.py``).
"""
