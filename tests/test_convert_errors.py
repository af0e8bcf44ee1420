"""Bad converter input: one clear error naming the problem, and nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from hf_checkpoint import apple_config, write_hf_checkpoint
from mlx.utils import tree_flatten
from mlx_openelm.convert import convert
from tiny import TINY_CONFIG, tiny_args

from mlx_openelm import preset, random_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights():
    return dict(tree_flatten(random_model(tiny_args(), dtype="float32", seed=1).parameters()))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, weights):
    return write_hf_checkpoint(weights, TINY_CONFIG, tmp_path_factory.mktemp("hf") / "src")


def _fails(tmp_path, source, error, match, **kwargs):
    """Convert ``source`` into ``tmp_path/out``: expect ``error`` matching ``match`` and an untouched folder."""
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error, match=match) as info:
        convert(source, tmp_path / "out", tokenizer_rebuild=False, **kwargs)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary folder
    return str(info.value)


def test_missing_path_and_bad_repo_id(tmp_path):
    _fails(tmp_path, tmp_path / "nowhere", FileNotFoundError, "no such directory")
    _fails(tmp_path, "not a/repo/id", FileNotFoundError, "not a Hugging Face repo id")


def test_no_config_and_wrong_model_type(tmp_path, checkpoint):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    _fails(tmp_path, src, FileNotFoundError, "has no config.json")
    (src / "config.json").write_text(json.dumps({**apple_config(TINY_CONFIG), "model_type": "llama"}))
    _fails(tmp_path, src, ValueError, "model_type 'llama', expected 'openelm'")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda w: w.pop("transformer.layers.1.ffn.proj_1.weight"), "missing tensor transformer.layers.1.ffn.proj_1"),
        (lambda w: w.update(lm_head=mx.zeros((128, 64))), "unexpected tensor lm_head"),
        (
            lambda w: w.update({"transformer.layers.2.attn.qkv_proj.weight": mx.zeros((100, 64))}),
            r"tensor transformer.layers.2.attn.qkv_proj.weight: expected shape \(192, 64\), got \(100, 64\)",
        ),
    ],
)
def test_tensor_mismatch_is_named(tmp_path, weights, edit, message):
    bad = dict(weights)
    edit(bad)
    src = write_hf_checkpoint(bad, TINY_CONFIG, tmp_path / "src")
    _fails(tmp_path, src, ValueError, message)


def test_truncated_and_corrupt_safetensors(tmp_path, checkpoint):
    src = write_hf_checkpoint({}, TINY_CONFIG, tmp_path / "src")
    data = (checkpoint / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:-100])
    _fails(tmp_path, src, ValueError, "truncated or corrupt")
    (src / "model.safetensors").write_bytes(data[:8] + b"\x00garbage" + data[16:])
    _fails(tmp_path, src, ValueError, "unreadable header")
    (src / "model.safetensors").write_bytes(b"\x01\x02")
    _fails(tmp_path, src, ValueError, "shorter than a header")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"q_bits": 7}, "unsupported bits 7; choose one of 2, 3, 4, 5, 6, 8"),
        ({"quantize": True, "q_group_size": 16}, "unsupported group size 16"),
        ({"q_recipe": "q4_k_m"}, "unknown quantization recipe 'q4_k_m'"),
        ({"q_recipe": "mixed_4_6", "q_bits": 8}, "drop --q-bits 8"),
        ({"dtype": "float64"}, "unknown dtype 'float64'"),
    ],
)
def test_unsupported_settings(tmp_path, checkpoint, kwargs, message):
    _fails(tmp_path, checkpoint, ValueError, message, **kwargs)


def test_existing_output_is_refused_unless_forced(tmp_path, checkpoint):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    _fails(tmp_path, checkpoint, FileExistsError, "already exists")
    convert(checkpoint, tmp_path / "out", force=True, tokenizer_rebuild=False)
    assert not (tmp_path / "out" / "keep").exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_float16_refused_for_3b_width_unless_forced(tmp_path):
    config = preset("OpenELM-3B").to_dict()
    src = write_hf_checkpoint({"transformer.norm.weight": mx.ones((3072,))}, config, tmp_path / "src")
    _fails(tmp_path, src, ValueError, "float16 is refused.*--force-float16", dtype="float16")
    # Forced, it goes on to the tensor check (this checkpoint holds one tensor only).
    _fails(tmp_path, src, ValueError, "missing tensor", dtype="float16", force_float16=True)


def test_pickle_checkpoint_refused(tmp_path):
    src = write_hf_checkpoint({}, TINY_CONFIG, tmp_path / "src")
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not read")
    _fails(tmp_path, src, ValueError, "pass --allow-bin")
    try:
        import torch  # noqa: F401
    except ImportError:
        _fails(tmp_path, src, ValueError, "PyTorch, not installed: pip install torch", allow_bin=True)


def test_interrupted_conversion_leaves_nothing(tmp_path, checkpoint):
    def interrupt(done, total):
        raise KeyboardInterrupt

    _fails(tmp_path, checkpoint, KeyboardInterrupt, None, progress=interrupt)  # after the first tensor


def test_cli_prints_one_error_line(tmp_path, weights):
    bad = dict(weights)
    bad.pop("transformer.norm.weight")
    src = write_hf_checkpoint(bad, TINY_CONFIG, tmp_path / "src")
    run = subprocess.run([sys.executable, "-m", "cli", "convert", str(src), "-o", str(tmp_path / "out")],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 1 and not (tmp_path / "out").exists()
    expected = f"error: {src} does not match its config.json: missing tensor transformer.norm.weight"
    assert run.stderr.splitlines() == [expected]
