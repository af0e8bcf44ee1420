"""Shared pytest setup: test helper modules in this folder are importable by name."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# The memorizing model (trained once per session), for every test file that takes it by name.
from trained_model import trained_checkpoint  # noqa: E402, F401


def pytest_report_header(config):
    import mlx.core as mx

    return f"mlx {mx.__version__}, default device {mx.default_device()}"
