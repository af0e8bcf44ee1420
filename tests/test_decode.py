import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from tiny import tiny_args

from mlx_openelm import generate_step, make_cache, random_model
from mlx_openelm.decode import DecodeStep, attention_window


def _model(dtype="float32", **overrides):
    # A distinct rope base gives a model a plan (structure) of its own, so its trace count starts at zero.
    return random_model(tiny_args(**overrides), dtype=dtype, seed=0)


def _traces_expected(positions, capacity):
    """One trace per (capacity, attention window) a run goes through; none per step."""
    return len({(capacity(n), attention_window(n, capacity(n))) for n in positions})


def _ids(batch, length, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 128, (batch, length)), dtype=mx.uint32)


def _teacher_forced(model, tokens, prompt, **step_kw):
    """Feed ``tokens`` after a ``prompt``-token prefill through the model's path and the decode step; return
    the worst logit difference and whether every step's argmax agreed."""
    plain, fast = make_cache(model), make_cache(model)
    model(tokens[:, : prompt - 1], cache=plain)
    model(tokens[:, : prompt - 1], cache=fast)
    step = DecodeStep(model, fast, **step_kw)
    worst, same = 0.0, True
    for i in range(prompt - 1, tokens.shape[1]):
        a = model(tokens[:, i : i + 1], cache=plain)[:, -1, :].astype(mx.float32)
        b = step(tokens[:, i : i + 1]).astype(mx.float32)
        worst = max(worst, mx.abs(a - b).max().item())
        same = same and mx.array_equal(mx.argmax(a, -1), mx.argmax(b, -1)).item()
    return worst, same, step, fast


@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_step_matches_the_model_for_512_tokens_across_capacity_growth(batch):
    model = _model(rope_freq_constant=10001.0 + batch)
    worst, same, step, cache = _teacher_forced(model, _ids(batch, 8 + 512, seed=batch), prompt=8)
    assert same and worst < 1e-4
    # Capacity grew 256 -> 512 -> 768 one token at a time, the attention window in steps of 64 and 256.
    assert cache[0].keys.shape[2] == 768 and cache[0].offset == 8 + 512
    assert step.traces == _traces_expected(range(8, 8 + 512), lambda n: max(256, -(-n // 256) * 256)) == 9


def test_compiled_and_uncompiled_generation_give_the_same_512_greedy_tokens():
    model = _model(rope_freq_constant=10004.0)
    prompt = _ids(1, 8)[0]
    fast = [t for t, _ in generate_step(prompt, model, max_tokens=512)]
    plain = [t for t, _ in generate_step(prompt, model, max_tokens=512, compile=False)]
    assert fast == plain


def test_one_trace_serves_every_generation_sized_within_one_capacity():
    model = _model(rope_freq_constant=10005.0)
    runs = [(_ids(1, 8, seed=1)[0], 200), (_ids(1, 30, seed=2)[0], 150), (_ids(1, 3, seed=3)[0], 60)]
    for prompt, n in runs:  # every run fits a 256-token cache: the first traces its windows, the others reuse them
        assert len(list(generate_step(prompt, model, max_tokens=n))) == n
    cache = make_cache(model)
    list(generate_step(runs[0][0], model, max_tokens=200, prompt_cache=cache))
    assert cache[0].keys.shape[2] == 256
    assert DecodeStep(model, make_cache(model)).traces == _traces_expected(range(8, 8 + 200), lambda n: 256) == 4


def test_eager_step_equals_compiled_step_and_lanes_change_nothing():
    model = _model(rope_freq_constant=10006.0)
    tokens = _ids(2, 40, seed=4)
    outs = []
    for kw in ({"compile": True, "lanes": 1}, {"compile": False, "lanes": 1}, {"compile": True, "lanes": 3}):
        cache = make_cache(model)
        model(tokens[:, :20], cache=cache)
        step = DecodeStep(model, cache, **kw)
        outs.append(mx.concatenate([step(tokens[:, i : i + 1])[:, None] for i in range(20, 40)], axis=1))
    assert mx.array_equal(outs[0], outs[1])
    assert mx.allclose(outs[0], outs[2], atol=1e-5, rtol=1e-5)


def test_bfloat16_step_follows_the_model():
    worst, same, _, _ = _teacher_forced(_model("bfloat16", rope_freq_constant=10007.0), _ids(1, 72, seed=5), 8)
    assert same and worst < 0.1


@pytest.mark.parametrize("scales", [mx.float32, mx.bfloat16])
def test_quantized_step_follows_the_model(scales):
    model = _model(rope_freq_constant=10008.0)
    nn.quantize(model, group_size=32, bits=4)
    model.set_dtype(scales)
    worst, same, _, _ = _teacher_forced(model, _ids(1, 72, seed=6), 8, lanes=2)
    assert same and worst < (1e-4 if scales == mx.float32 else 0.1)


def test_falls_back_to_the_model_path_when_compiling_fails(monkeypatch):
    def unsupported(fn):
        def call(*args):
            raise RuntimeError("compile is not supported here")

        return call

    monkeypatch.setattr(mx, "compile", unsupported)
    model = _model(rope_freq_constant=10009.0)  # a fresh plan: its step is built with the failing compile
    prompt = _ids(1, 8, seed=7)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = [t for t, _ in generate_step(prompt, model, max_tokens=24)]
    assert any("uncompiled path" in str(w.message) for w in caught)
    assert tokens == [t for t, _ in generate_step(prompt, model, max_tokens=24, compile=False)]


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("bfloat16", 0.1)])
def test_prefill_through_the_step_matches_the_model(dtype, tol):
    model = _model(dtype, rope_freq_constant=10010.0)
    tokens = _ids(2, 150, seed=8)
    plain, fast = make_cache(model), make_cache(model)
    step = DecodeStep(model, fast, lanes=2)
    chunks = [(0, 70), (70, 149)]  # chunked like generate_step, the second chunk attending to the first
    for a, b in chunks:
        expected = model(tokens[:, a:b], cache=plain)[:, -1, :]
        got = step.prefill(tokens[:, a:b])
        assert mx.abs(expected.astype(mx.float32) - got.astype(mx.float32)).max().item() < tol
    assert fast[0].offset == plain[0].offset == 149
    for p, f in zip(plain, fast):
        assert mx.abs(p.keys[..., :149, :] - f.keys[..., :149, :]).max().item() < tol
        assert mx.abs(p.values[..., :149, :] - f.values[..., :149, :]).max().item() < tol
    last = tokens[:, 149:]
    assert mx.array_equal(mx.argmax(step(last), -1), mx.argmax(model(last, cache=plain)[:, -1, :], -1))


@pytest.mark.parametrize("stored, quantize, on_cpu", [
    ("bfloat16", True, mx.float32), ("bfloat16", False, mx.bfloat16), ("float16", False, mx.float32),
    ("float32", False, mx.float32),
])
def test_dtype_auto_computes_in_float32_on_the_cpu_unless_dense_bfloat16(tmp_path, stored, quantize, on_cpu):
    from mlx_openelm import load_model, save

    model = _model(stored)
    config = {}
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
        config = {"quantization": {"group_size": 32, "bits": 4, "mode": "affine"}}
    folder = save(model, tmp_path / "model", config=config)
    auto = load_model(folder, dtype="auto")
    expected = on_cpu if mx.default_device().type == mx.cpu else getattr(mx, stored)
    assert auto.transformer.norm.weight.dtype == expected
    assert load_model(folder).transformer.norm.weight.dtype == getattr(mx, stored)  # None keeps what is stored
    if quantize:
        assert auto.layers[0].attn.qkv_proj.scales.dtype == expected
        assert auto.layers[0].attn.qkv_proj.weight.dtype == mx.uint32  # packed weights stay packed


def test_other_model_classes_run_through_their_own_forward(tmp_path):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    from mlx_openelm import save

    model = _model(rope_freq_constant=10011.0)
    theirs, _ = mlx_lm_load_model(save(model, tmp_path / "model"))  # mlx-lm's own OpenELM class, same weights
    prompt = _ids(1, 12, seed=9)[0]
    assert [t for t, _ in generate_step(prompt, theirs, max_tokens=20)] == [
        t for t, _ in generate_step(prompt, model, max_tokens=20)]
