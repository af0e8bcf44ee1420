"""Converter round trips: HF-format OpenELM checkpoints (tiny, uneven) -> MLX directories -> both loaders."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hf_checkpoint import write_hf_checkpoint
from mlx.utils import tree_flatten
from mlx_lm.utils import quantize_model
from mlx_openelm.convert import convert
from mlx_openelm.convert.quantize import recipe_bits
from safetensors.numpy import load_file
from spm_util import train_spm
from tiny import TINY_CONFIG, tiny_args

from mlx_openelm import Model, __version__, generate_step, load, load_model, random_model
from mlx_openelm.tokenizer_fetch import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENS = mx.array(np.random.default_rng(0).integers(0, TINY_CONFIG["vocab_size"], (2, 9)))


@pytest.fixture(scope="module")
def source_model():
    return random_model(tiny_args(), dtype="float32", seed=3)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_spm(out)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, source_model, tokenizer_dir):
    """A single-file HF checkpoint with a tokenizer.model beside it."""
    out = write_hf_checkpoint(source_model, TINY_CONFIG, tmp_path_factory.mktemp("hf") / "OpenELM-tiny")
    shutil.copy(tokenizer_dir / "tokenizer.model", out)
    return out


def _same_parameters(a, b) -> bool:
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    return pa.keys() == pb.keys() and all(pa[k].dtype == pb[k].dtype and mx.array_equal(pa[k], pb[k]) for k in pa)


def _reference(source_model, dtype):
    model = Model(source_model.args)
    model.load_weights(list(tree_flatten(source_model.parameters())))
    model.set_dtype(dtype)
    return model


@pytest.mark.parametrize("shards", [1, 3])
def test_float32_round_trip_is_exact(tmp_path, source_model, tokenizer_dir, shards):
    src = write_hf_checkpoint(source_model, TINY_CONFIG, tmp_path / "src", shards=shards)
    if shards > 1:
        assert (src / "model.safetensors.index.json").is_file() and not (src / "model.safetensors").exists()
    result = convert(src, tmp_path / "out", dtype="float32", tokenizer=tokenizer_dir / "tokenizer.model")
    model, tokenizer = load(result.path)
    assert mx.array_equal(model(TOKENS), source_model(TOKENS))
    assert tokenizer.encode("Hello world")[0] == 1
    config = json.loads((result.path / "config.json").read_text())
    assert config["mlx_openelm_version"] == __version__ and config["converted_from"] == str(src)
    assert config["torch_dtype"] == "float32" and "quantization" not in config
    assert config["architectures"] == ["OpenELMForCausalLM"]  # the source config is kept
    assert result.tokenizer_note is None and result.bits_per_weight == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary directory left


def test_bfloat16_output_is_cast_source_and_loads_in_mlx_lm(tmp_path, source_model, checkpoint):
    import mlx_lm

    result = convert(checkpoint, tmp_path / "out")  # bfloat16 by default; tokenizer from the source folder
    ours = load_model(result.path)
    assert {v.dtype for _, v in tree_flatten(ours.parameters())} == {mx.bfloat16}
    assert mx.array_equal(ours(TOKENS), _reference(source_model, mx.bfloat16)(TOKENS))
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in result.path.iterdir()}
    theirs, tokenizer = mlx_lm.load(str(result.path))
    assert _same_parameters(theirs, ours)  # mlx-lm's own OpenELM class, loaded strictly
    # mlx-lm reads our tokenizer.json: the same prompt ids; its generation loop and ours, on its model, agree.
    ids = load_tokenizer(result.path).encode("Hello world")
    assert tokenizer.encode("Hello world") == ids
    responses = list(mlx_lm.stream_generate(theirs, tokenizer, "Hello world", max_tokens=4))
    assert [r.token for r in responses] == [t for t, _ in generate_step(mx.array(ids), theirs, max_tokens=4)]


def test_output_shards_with_index(tmp_path, source_model, checkpoint):
    result = convert(checkpoint, tmp_path / "out", dtype="float32", max_shard_bytes=64 << 10)
    files = sorted(p.name for p in result.path.glob("model*.safetensors"))
    index = json.loads((result.path / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    assert set(index["weight_map"]) == {k for k, _ in tree_flatten(source_model.parameters())}
    for file in files:  # the reference safetensors reader (strict about the header and offsets) agrees
        for name, value in load_file(str(result.path / file)).items():
            assert np.array_equal(value, np.array(dict(tree_flatten(source_model.parameters()))[name]))
    assert mx.array_equal(load_model(result.path)(TOKENS), source_model(TOKENS))


def test_quantized_output_matches_mlx_lm_quantization_and_reports_skipped_layers(tmp_path, source_model, checkpoint):
    # Group size 64: layer 0's proj_2 (input width 32) and layer 1's out_proj (96) must stay in float.
    result = convert(checkpoint, tmp_path / "out", quantize=True, q_bits=4, q_group_size=64)
    skipped = ["transformer.layers.0.ffn.proj_2", "transformer.layers.1.attn.out_proj"]
    assert result.unquantized == skipped
    config = json.loads((result.path / "config.json").read_text())
    expected = {"group_size": 64, "bits": 4, "mode": "affine", **dict.fromkeys(skipped, False)}
    assert config["quantization"] == config["quantization_config"] == expected
    model = load_model(result.path)
    assert isinstance(model.transformer.token_embeddings, nn.QuantizedEmbedding)
    assert isinstance(model.layers[1].ffn.proj_2, nn.QuantizedLinear)
    assert type(model.layers[0].ffn.proj_2) is nn.Linear
    # mlx-lm's own in-memory path (cast, then nn.quantize) gives the very same model.
    reference, _ = quantize_model(_reference(source_model, mx.bfloat16), {}, 64, 4)
    assert mx.array_equal(model(TOKENS), reference(TOKENS))


def test_mixed_recipe_record_and_reload(tmp_path, source_model, checkpoint):
    import mlx_lm

    result = convert(checkpoint, tmp_path / "out", q_recipe="mixed_4_6", q_group_size=32)
    record = result.quantization
    assert record["bits"] == 4 and record["transformer.token_embeddings"]["bits"] == 6
    model = load_model(result.path)
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            assert module.bits == recipe_bits(path, 3, 4, 6) and module.group_size == 32
    assert model.transformer.token_embeddings.bits == 6
    theirs, _ = mlx_lm.load(str(result.path))
    assert _same_parameters(theirs, model) and type(theirs.transformer.layers[2].ffn.proj_2) is nn.QuantizedLinear
    assert 4 < result.bits_per_weight < 16


def test_recipe_gives_more_bits_to_embeddings_and_sensitive_layers():
    high = [i for i in range(16) if recipe_bits(f"transformer.layers.{i}.ffn.proj_2", 16, 4, 6) == 6]
    assert high == [0, 1, 4, 7, 10, 13, 14, 15]  # first and last eighth, and every third layer between
    assert recipe_bits("transformer.layers.4.attn.qkv_proj", 16, 4, 6) == 6
    assert recipe_bits("transformer.layers.4.attn.out_proj", 16, 4, 6) == 4
    assert recipe_bits("transformer.layers.3.ffn.proj_1", 16, 4, 6) == 4
    assert recipe_bits("transformer.token_embeddings", 16, 4, 8) == 8


def test_rotary_buffers_are_dropped_by_name(tmp_path, source_model):
    weights = dict(tree_flatten(source_model.parameters()))
    weights["transformer.layers.0.attn.pos_embedding.inv_freq"] = mx.ones((8,))
    src = write_hf_checkpoint(weights, TINY_CONFIG, tmp_path / "src")
    result = convert(src, tmp_path / "out", dtype="float32", tokenizer_rebuild=False)
    assert result.dropped == ["transformer.layers.0.attn.pos_embedding.inv_freq"]
    assert mx.array_equal(load_model(result.path)(TOKENS), source_model(TOKENS))


def test_missing_tokenizer_finishes_with_a_note(tmp_path, source_model):
    src = write_hf_checkpoint(source_model, TINY_CONFIG, tmp_path / "src")
    result = convert(src, tmp_path / "out", tokenizer_rebuild=False)
    assert "mlx-openelm tokenizer fetch -o" in result.tokenizer_note and str(tmp_path / "out") in result.tokenizer_note
    assert not (result.path / "tokenizer.model").exists() and (result.path / "config.json").is_file()


def test_progress_reports_source_bytes(tmp_path, checkpoint):
    calls = []
    convert(checkpoint, tmp_path / "out", progress=lambda done, total: calls.append((done, total)))
    total = (checkpoint / "model.safetensors").stat().st_size
    assert calls[-1][0] == calls[-1][1] and 0.99 * total < calls[-1][1] < total  # the header is not counted
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def _hub_cache(hf_home: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay out ``files`` as huggingface_hub caches a downloaded snapshot (blobs, symlinked snapshot, refs)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, path in files.items():
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


def _cli(*args, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, env=env, capture_output=True, text=True)


def test_hub_repo_converts_offline_from_the_local_cache(tmp_path, source_model, checkpoint):
    repo_id = "apple/OpenELM-tiny-Instruct"
    files = {p.name: p for p in checkpoint.iterdir()}
    _hub_cache(tmp_path / "hf", repo_id, files)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    run = _cli("convert", repo_id, "-o", str(tmp_path / "out"), "--dtype", "float32", env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"wrote {tmp_path / 'out'} from {repo_id} (float32")
    assert run.stderr == ""  # quiet when piped: no progress bar
    model, tokenizer = load(tmp_path / "out")
    assert mx.array_equal(model(TOKENS), source_model(TOKENS))
    assert "<|assistant|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])  # -Instruct
    assert json.loads((tmp_path / "out" / "config.json").read_text())["converted_from"] == repo_id

    missing = _cli("convert", "apple/OpenELM-nothing", "-o", str(tmp_path / "none"), env=env)
    assert missing.returncode == 1 and not (tmp_path / "none").exists()
    assert missing.stderr.startswith("error: apple/OpenELM-nothing is not (fully) in the Hugging Face cache")
    assert len(missing.stderr.strip().splitlines()) == 1


def test_bfloat16_top1_agrees_with_float32_on_the_trained_model(tmp_path, trained_checkpoint):
    # Teacher-forced predictions of every token of the memorized continuation, in both framings (plain and
    # Instruct): the answers the model was trained to give.
    fp32 = load_model(convert(trained_checkpoint.path, tmp_path / "fp32", dtype="float32").path)
    bf16 = load_model(convert(trained_checkpoint.path, tmp_path / "bf16").path)
    agree = []
    for prompt, continuation in trained_checkpoint.sequences():
        tokens = mx.array([prompt + continuation[:-1]])
        top1 = [mx.argmax(m(tokens)[0, len(prompt) - 1 :], -1) for m in (fp32, bf16)]
        agree.append(top1[0] == top1[1])
    agreement = mx.concatenate(agree).astype(mx.float32).mean().item()
    assert agreement >= 0.99


def test_a_killed_conversion_leaves_nothing_the_next_run_does_not_clean(tmp_path):
    # Measured as a user would see it: kill -9 while the temporary folder is being written, then convert again.
    import os
    import signal
    import stat
    import subprocess
    import sys
    import time

    from mlx_openelm import preset

    args = preset("OpenELM-270M", model_dim=512, head_dim=64, vocab_size=32000)
    src = write_hf_checkpoint(random_model(args, dtype="float32"), args.to_dict(), tmp_path / "src")
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).with_name("mlx-openelm")), "convert", str(src), "-o", str(out), "--dtype",
           "float32", "--tokenizer", "none-given"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(p.glob("model*.safetensors") for p in tmp_path.glob(".out.*.tmp")):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    stale = list(tmp_path.glob(".out.*.tmp"))
    assert len(stale) == 1 and not out.exists(), "the kill must land mid-conversion"
    result = convert(src, out, dtype="float32", tokenizer_rebuild=False)
    assert result.stale_removed == [stale[0].name] and not stale[0].exists()
    assert any("left by interrupted conversions" in line for line in result.summary())
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in out.glob("*.json"))
