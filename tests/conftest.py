"""Shared pytest setup: test helper modules in this folder are importable by name."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

# The memorizing model (trained once per session), for every test file that takes it by name.
from trained_model import trained_checkpoint  # noqa: E402, F401


@pytest.fixture(params=["cpu", "metal", "cuda"])
def simulated_backend(request):
    """Every device decision (kernel set, lanes, attention masks, chunk sizes, wired memory, cache trimming,
    collective stream, labels) as on ``cpu``, ``metal`` or ``cuda``, while the arithmetic runs here: a test that takes
    this fixture runs under all three (``@pytest.mark.parametrize("simulated_backend", ["metal"], indirect=True)``
    picks some)."""
    from mlx_openelm import backend

    with backend.simulate(request.param):
        yield request.param


def pytest_report_header(config):
    import mlx.core as mx

    return f"mlx {mx.__version__}, default device {mx.default_device()}"
