import mlx.core as mx
import numpy as np
import pytest
from decode_util import FLOAT32
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import get_total_parameters
from numpy_reference import forward
from tiny import TINY_CONFIG, tiny_args

from mlx_openelm import Model, preset, random_model


def _tiny(dtype="float32", seed=0):
    return random_model(tiny_args(), dtype=dtype, seed=seed)


def _weights(model):
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


def _tokens(batch=1, length=12, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, TINY_CONFIG["vocab_size"], (batch, length)))


def test_module_names_are_checkpoint_names():
    names = set(_weights(_tiny()))
    assert "transformer.token_embeddings.weight" in names and "transformer.norm.weight" in names
    for suffix in ("attn_norm", "attn.qkv_proj", "attn.q_norm", "attn.k_norm", "attn.out_proj", "ffn_norm",
                   "ffn.proj_1", "ffn.proj_2"):
        assert f"transformer.layers.2.{suffix}.weight" in names
    assert len(names) == 3 * 8 + 2  # 8 tensors per layer + embeddings + final norm, as mlx-lm loads strictly
    assert not any("lm_head" in n for n in names)


def test_per_layer_widths_follow_config():
    w = _weights(_tiny())
    for i, (q, kv) in enumerate(zip(TINY_CONFIG["num_query_heads"], TINY_CONFIG["num_kv_heads"])):
        assert w[f"transformer.layers.{i}.attn.qkv_proj.weight"].shape == ((q + 2 * kv) * 16, 64)
        assert w[f"transformer.layers.{i}.attn.out_proj.weight"].shape == (64, q * 16)
    assert [w[f"transformer.layers.{i}.ffn.proj_2.weight"].shape[1] for i in range(3)] == [32, 128, 256]


def test_float32_matches_independent_numpy_reference():
    model = _tiny()
    tokens = _tokens(batch=2, length=16)
    ours = np.array(model(tokens))
    ref = forward(_weights(model), TINY_CONFIG, np.array(tokens))
    assert np.abs(ours - ref).max() < FLOAT32


@pytest.mark.parametrize("batch", [1, 2])
def test_incremental_decoding_matches_full_forward_across_cache_growth(batch):
    model = _tiny()
    length = 262  # the cache grows in steps of 256: cross that boundary one token at a time
    tokens = _tokens(batch=batch, length=length, seed=1)
    full = model(tokens)
    cache = make_prompt_cache(model)  # the model's own forward pass runs over mlx-lm's per-layer caches
    prompt = 250
    parts = [model(tokens[:, :prompt], cache=cache)]
    for i in range(prompt, length):
        parts.append(model(tokens[:, i : i + 1], cache=cache))
    stepped = mx.concatenate(parts, axis=1)
    assert cache[0].offset == length
    assert mx.abs(stepped - full).max().item() < FLOAT32


def test_cache_trim_and_state():
    model = _tiny()
    tokens = _tokens(length=10)
    cache = make_prompt_cache(model)
    model(tokens, cache=cache)
    assert [c.trim(3) for c in cache] == [3] * 3 and cache[0].offset == 7
    keys, values, offset = cache[0].state
    assert offset == 7 and keys.shape[1] == TINY_CONFIG["num_kv_heads"][0]
    assert cache[2].state[0].shape[1] == TINY_CONFIG["num_kv_heads"][2]
    again = model(tokens[:, 7:], cache=cache)
    assert mx.abs(again - model(tokens)[:, 7:]).max().item() < FLOAT32


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("bfloat16", 0.25), ("float16", 0.05)])
def test_half_precisions_run_and_stay_close(dtype, tol):
    ref = np.array(_tiny("float32")(_tokens()))
    out = _tiny(dtype)(_tokens())
    assert out.dtype == getattr(mx, dtype)
    err = np.abs(np.array(out.astype(mx.float32)) - ref)
    assert np.isfinite(err).all() and err.mean() < tol


def test_270m_preset_parameter_count():
    model = Model(preset("OpenELM-270M"))
    assert abs(get_total_parameters(model) - 271.5e6) < 0.1e6


def test_mlx_lm_generate_step_drives_the_model():
    model = _tiny()
    prompt = _tokens(length=8)[0]
    steps = generate_step(prompt, model, max_tokens=20, prompt_cache=make_prompt_cache(model))
    theirs = [int(token) for token, _logprobs in steps]
    seq = prompt.tolist()
    for _ in range(20):
        seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1])))
    assert theirs == seq[8:]
