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


# Tiny random models with a real tokenizer, saved as folders, for the server's robustness tests.
def _random_model_dir(root: Path, **overrides) -> Path:
    import shutil

    from spm_util import train_spm
    from tiny import tiny_args

    from mlx_openelm import random_model, save
    from mlx_openelm.tokenizer import Tokenizer

    spm = train_spm(root / "spm")
    args = tiny_args(vocab_size=Tokenizer.from_file(spm).vocab_size, max_context_length=2048, **overrides)
    folder = save(random_model(args, dtype="float32"), root / "model")
    shutil.copy(spm, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random model (it never says EOS, so a request runs to its budget) with a real tokenizer."""
    return _random_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory) -> Path:
    """A wider random model whose steps are slow enough (about 12 ms here) to stop a request half-way."""
    return _random_model_dir(tmp_path_factory.mktemp("wide"), model_dim=512, head_dim=64,
                             num_query_heads=[8, 8, 8], num_kv_heads=[2, 2, 2], ffn_multipliers=[4.0, 4.0, 4.0])
