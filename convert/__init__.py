"""Checkpoint conversion: Apple's OpenELM PyTorch safetensors -> MLX model directories."""
