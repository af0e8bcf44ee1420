import warnings

import mlx.core as mx
import mlx.nn as nn
import pytest
from decode_util import FLOAT32, ids, model_for, step_vs_model
from mlx_lm.models.cache import make_prompt_cache
from tiny import tiny_args

import mlx_openelm.linear as lin
from mlx_openelm import backend, generate_step, make_cache, random_model
from mlx_openelm.batch import BatchEngine, Sequence
from mlx_openelm.cache import KVCache
from mlx_openelm.cpu_kernels import CpuKernels
from mlx_openelm.decode import DecodeFallbackWarning, DecodeStep, FastKernels, attention_window, model_forward

ON_CPU = mx.default_device().type == mx.cpu  # where the arithmetic runs (a simulated backend changes decisions only)
# Measured on MLX 0.32's CPU backend: both kernel sets reproduce the model's own forward pass bit for bit in
# float32, bfloat16 and 4-bit (max |logit difference| 0.0 over every configuration below). The bounds leave room
# only for reordered float32 sums: 1e-3 is a tenth of a bfloat16 rounding step at |logit| >= 2. Off the CPU the
# kernels differ from the model's (untested by us: no GPU was at hand), so the bounds there are looser.
TOLERANCE = {"float32": FLOAT32, "bfloat16": 1e-3 if ON_CPU else 0.1, "4-bit": 1e-3 if ON_CPU else 0.1}
BACKENDS = ("cpu", "metal", "cuda")


def _model(dtype="float32", **overrides):
    # A distinct rope base gives a model a plan (structure) of its own, so its trace count starts at zero.
    return random_model(tiny_args(**overrides), dtype=dtype, seed=0)


def _traces_expected(positions, capacity):
    """One trace per (capacity, attention window) a run goes through; none per step."""
    return len({(capacity(n), attention_window(n, capacity(n))) for n in positions})


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "4-bit"])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("kernels", ["cpu", "fast"])
def test_both_kernel_sets_follow_the_model(kernels, head_dim, dtype, batch):
    # Chunked prefill, single steps across the cache's growth and a verify pass, against the model's own forward.
    # head_dim 16 and 64 fold the query scale into RoPE (a power of two); 32 and 128 apply it in attention.
    worst, same, step = step_vs_model(model_for(head_dim, dtype), batch, kernels=kernels)
    assert step.kernels == kernels and not step.fallback
    assert same and worst <= TOLERANCE[dtype], f"max |logit difference| {worst}"


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "4-bit"])
def test_each_backends_decode_path_follows_the_model(simulated_backend, dtype, batch):
    # What auto picks under each backend (on CUDA: exact keys without a mask, compiled in layer pieces; on Metal:
    # causal prefill), over chunked prefill, single steps across capacity growth and a verify pass.
    worst, same, step = step_vs_model(model_for(64, dtype), batch)
    assert step.kernels == backend.kernels() and not step.fallback
    assert same and worst <= TOLERANCE[dtype], f"max |logit difference| {worst}"


def test_auto_picks_the_kernels_and_lanes_of_the_backend(simulated_backend):
    model = _model(rope_freq_constant=10050.0)
    step = DecodeStep(model)
    assert step.kernels == backend.kernels("auto") == ("cpu" if simulated_backend == "cpu" else "fast")
    assert step.fn.plan.lanes == (1 if simulated_backend != "cpu" else lin.cpu_lanes()) == lin.cpu_lanes()
    with pytest.raises(ValueError, match="kernels must be one of"):
        DecodeStep(model, kernels="metal")
    with pytest.raises(ValueError, match="attention must be one of"):
        DecodeStep(model, attention="none")


@pytest.mark.parametrize("lanes", [2, 3, 5])
@pytest.mark.parametrize("dtype", ["float32", "4-bit"])
def test_lanes_split_matmuls_by_rows_and_change_nothing(monkeypatch, simulated_backend, lanes, dtype):
    # A lane count given is honoured on every backend (issue #27: off the CPU the step used to force one lane, so
    # this test failed on any GPU).
    monkeypatch.setattr(lin, "MIN_SPLIT", 0)  # split every matmul, however small
    model = model_for(32, dtype, base=10100.0 + lanes)
    tokens = ids(2, 40, seed=4)
    outs = []
    for n in (1, lanes):
        cache = make_cache(model)
        step = DecodeStep(model, lanes=n, kernels="cpu")
        assert len(step.params["layers"][1]["linears"][2]) == n  # proj_1 really is cut into n row blocks
        step.prefill(cache, tokens[:, :20])
        outs.append(mx.concatenate([step(cache, tokens[:, i : i + 1])[:, None] for i in range(20, 40)], axis=1))
        assert not step.fallback
    assert mx.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_row_cuts_cover_every_row_once():
    for rows in (1, 7, 64, 1000):
        for n in range(1, min(rows, 9) + 1):
            cut = lin.row_cuts(rows, n)
            assert cut[0] == 0 and cut[-1] == rows and len(cut) == n + 1 and all(a < b for a, b in zip(cut, cut[1:]))


@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_step_matches_the_model_for_512_tokens_across_capacity_growth(batch):
    model = _model(rope_freq_constant=10001.0 + batch)
    tokens = ids(batch, 8 + 512, seed=batch)
    plain, fast = make_prompt_cache(model), make_cache(model)
    model(tokens[:, :7], cache=plain)
    step = DecodeStep(model)
    step.prefill(fast, tokens[:, :7])
    for i in range(7, tokens.shape[1]):
        a = model(tokens[:, i : i + 1], cache=plain)[:, -1]
        b = step(fast, tokens[:, i : i + 1])
        assert mx.abs(a - b).max().item() < FLOAT32 and mx.array_equal(a.argmax(-1), b.argmax(-1)).item()
    # Capacity grew 256 -> 512 -> 768 one token at a time, the attention window in steps of 64 and 256.
    assert fast.capacity == 768 and fast.offset == 8 + 512
    assert step.traces == _traces_expected(range(8, 8 + 512), lambda n: max(256, -(-n // 256) * 256)) == 9


def test_the_step_compiled_op_by_op_and_the_models_forward_give_the_same_512_greedy_tokens():
    model = _model(rope_freq_constant=10004.0)
    prompt = ids(1, 8)[0]
    fast = [t for t, _ in generate_step(prompt, model, max_tokens=512)]
    assert fast == [t for t, _ in generate_step(prompt, model, max_tokens=512, compile=False)]
    assert fast == [t for t, _ in generate_step(prompt, model, max_tokens=512, prompt_cache=make_prompt_cache(model))]


def test_one_trace_serves_every_generation_sized_within_one_capacity():
    model = _model(rope_freq_constant=10005.0)
    runs = [(ids(1, 8, seed=1)[0], 200), (ids(1, 30, seed=2)[0], 150), (ids(1, 3, seed=3)[0], 60)]
    for prompt, n in runs:  # every run fits a 256-token cache: the first traces its windows, the others reuse them
        assert len(list(generate_step(prompt, model, max_tokens=n))) == n
    cache = make_cache(model)
    list(generate_step(runs[0][0], model, max_tokens=200, prompt_cache=cache))
    assert cache.capacity == 256
    assert DecodeStep(model).traces == _traces_expected(range(8, 8 + 200), lambda n: 256) == 4


def test_falls_back_to_the_model_path_when_compiling_fails(monkeypatch):
    def unsupported(fn):
        def call(*args):
            raise RuntimeError("compile is not supported here")

        return call

    monkeypatch.setattr(mx, "compile", unsupported)
    model = _model(rope_freq_constant=10009.0)  # a fresh plan: its step is built with the failing compile
    prompt = ids(1, 8, seed=7)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = [t for t, _ in generate_step(prompt, model, max_tokens=24)]
    warned = [str(w.message) for w in caught if "model's own forward pass" in str(w.message)]
    assert len(warned) == 1 and "compile is not supported" in warned[0]
    assert tokens == [t for t, _ in generate_step(prompt, model, max_tokens=24, prompt_cache=make_prompt_cache(model))]


def _fails_when_evaluated(q, keys, values, mask):
    # An attention kernel whose result cannot be computed: the error surfaces only at evaluation.
    broken = mx.linalg.inv(mx.zeros((2, 2)), stream=mx.cpu)[0, 0]
    return mx.zeros(q.shape, q.dtype) + broken.astype(q.dtype)


@pytest.mark.parametrize("prefill", [True, False])
@pytest.mark.parametrize("compile", [True, False])
def test_falls_back_when_a_kernel_fails_at_evaluation(monkeypatch, compile, prefill):
    # The failure surfaces at the first call that evaluates the broken kernel: a prefill chunk (eager), or a step
    # (compiled or eager). Either way the step warns once and gives the model's own logits from then on.
    for kernels in (CpuKernels, FastKernels):
        monkeypatch.setattr(kernels, "attend", lambda self, *a: _fails_when_evaluated(*a))
    model = _model(rope_freq_constant=10012.0 + 2 * compile + prefill)  # a fresh plan: traced with the patch
    tokens = ids(1, 12, seed=8)
    plain, cache = make_prompt_cache(model), make_cache(model)
    step = DecodeStep(model, compile=compile)
    expected, got = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if prefill:
            expected.append(model(tokens[:, :8], cache=plain)[:, -1])
            got.append(step.prefill(cache, tokens[:, :8]))
        for i in range(8 if prefill else 0, 12):
            expected.append(model(tokens[:, i : i + 1], cache=plain)[:, -1])
            got.append(step(cache, tokens[:, i : i + 1]))
    warned = [str(w.message) for w in caught if issubclass(w.category, DecodeFallbackWarning)]
    assert len(warned) == 1 and "Inverse" in warned[0] and step.fallback
    assert all(mx.array_equal(a, b).item() for a, b in zip(expected, got))


@pytest.mark.parametrize("stored, quantize, on_cpu", [
    ("bfloat16", True, mx.float32), ("bfloat16", False, mx.bfloat16), ("float16", False, mx.float32),
    ("float32", False, mx.float32),
])
def test_dtype_auto_computes_in_float32_on_the_cpu_unless_dense_bfloat16(tmp_path, simulated_backend, stored,
                                                                        quantize, on_cpu):
    from mlx_openelm import load_model, save

    model = _model(stored)
    config = {}
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
        config = {"quantization": {"group_size": 32, "bits": 4, "mode": "affine"}}
    folder = save(model, tmp_path / "model", config=config)
    auto = load_model(folder, dtype="auto")
    expected = on_cpu if simulated_backend == "cpu" else getattr(mx, stored)
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
    prompt = ids(1, 12, seed=9)[0]
    assert [t for t, _ in generate_step(prompt, theirs, max_tokens=20)] == [
        t for t, _ in generate_step(prompt, model, max_tokens=20)]


class AttentionSpy:
    """Records what each call of MLX's fused attention got: query length, key count, and the mask's kind."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[int, int, str | None]] = []
        real = mx.fast.scaled_dot_product_attention

        def spy(q, k, v, *, scale, mask=None, **kw):
            self.calls.append((q.shape[2], k.shape[2], "array" if isinstance(mask, mx.array) else mask))
            return real(q, k, v, scale=scale, mask=mask, **kw)

        monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", spy)

    def take(self) -> list[tuple[int, int, str | None]]:
        calls, self.calls = self.calls, []
        return calls


def _close(a: mx.array, b: mx.array) -> bool:
    return mx.abs(a - b).max().item() <= FLOAT32 and mx.array_equal(a.argmax(-1), b.argmax(-1)).item()


@pytest.mark.parametrize("compile", [False, True])
def test_fast_kernels_give_fused_attention_what_each_backend_accepts(monkeypatch, simulated_backend, compile):
    # Issue #27, 3: on CUDA, MLX's fused attention kernels refuse array masks, so a decode token gets none (the keys
    # sliced to exactly the positions written); a prompt chunk gets "causal" on CUDA and Metal (Metal's causal
    # kernel skips masked blocks); the CPU keeps its masks. The logits stay the model's own either way.
    spy = AttentionSpy(monkeypatch)
    model = model_for(64, "float32", base=10200.0 + 10 * BACKENDS.index(simulated_backend) + compile)  # fresh plan
    tokens = ids(1, 40, seed=5)
    plain, cache = make_prompt_cache(model), make_cache(model)
    expected = [model(tokens[:, :30], cache=plain)[:, -1]]
    expected += [model(tokens[:, i : i + 1], cache=plain)[:, -1] for i in range(30, 40)]
    spy.take()  # the model's own calls
    step = DecodeStep(model, compile=compile, kernels="fast")
    assert _close(expected[0], step.prefill(cache, tokens[:, :30]))
    prefill = spy.take()
    for i in range(30, 40):
        assert _close(expected[i - 29], step(cache, tokens[:, i : i + 1]))
    decode = spy.take()
    assert not step.fallback and prefill and decode  # two layers: at least one call each
    if simulated_backend == "cpu":
        assert {c[2] for c in prefill + decode} == {"array"}
    else:
        assert prefill == [(30, 30, "causal")] * 2
    if simulated_backend == "cuda":  # every step, compiled or not: one query, exactly the keys written, no mask
        assert decode == [(1, i + 1, None) for i in range(30, 40) for _ in range(2)]
    else:  # one compiled trace over the coarse window (called only while tracing when compiled)
        assert {(q, k, m) for q, k, m in decode} == {(1, attention_window(40, cache.capacity), "array")}


def test_the_exact_path_compiles_its_layers_once_per_shape(simulated_backend):
    # Under CUDA each layer's work around attention is compiled on its own: the key count changing every step
    # must not retrace it.
    model = model_for(64, "bfloat16", base=10260.0 + BACKENDS.index(simulated_backend))
    step = DecodeStep(model, kernels="fast")
    cache = make_cache(model)
    tokens = ids(1, 60, seed=6)
    step.prefill(cache, tokens[:, :20])
    step(cache, tokens[:, 20:21])
    traced = step.traces
    for i in range(21, 60):
        step(cache, tokens[:, i : i + 1])
    assert step.traces == traced and cache.offset == 60 and not step.fallback


def test_rows_at_different_positions_never_attend_past_their_own(monkeypatch, simulated_backend):
    # A batch in flight has rows at different positions: the keys past a row's own position are garbage (zeros here,
    # another sequence's leftovers in the server), which exact attention without a mask would read. So such a batch
    # keeps a mask on every backend (on CUDA that is MLX's unfused path, as in mlx-lm's batches) and each row's
    # logits stay its own.
    spy = AttentionSpy(monkeypatch)
    model = model_for(64, "float32", base=10280.0 + BACKENDS.index(simulated_backend))
    step = DecodeStep(model, kernels="fast")
    tokens, starts = ids(2, 40, seed=7), (9, 25)
    rows, plains = [], []
    for r, n in enumerate(starts):
        one, plain = make_cache(model), make_prompt_cache(model)
        step.prefill(one, tokens[r : r + 1, :n])
        model(tokens[r : r + 1, :n], cache=plain)
        rows.append(one)
        plains.append(plain)
    cache = KVCache.like(rows[0], rows=0)
    for one in rows:
        cache.extend(one)
    expected = [[model(tokens[r : r + 1, n + i : n + i + 1], cache=plains[r])[:, -1] for r, n in enumerate(starts)]
                for i in range(6)]
    spy.take()  # the model's own calls
    for i in range(6):
        logits = step(cache, mx.concatenate([tokens[r : r + 1, n + i : n + i + 1] for r, n in enumerate(starts)]))
        assert all(_close(expected[i][r], logits[r : r + 1]) for r in range(2))
    assert {c[2] for c in spy.take()} <= {"array"} and cache.positions == [15, 31]


def test_the_models_own_forward_serves_rows_at_different_positions_and_lengths():
    # The fallback path: rows at different positions, prefilled right-padded with their own lengths, then decoded.
    model = _model(rope_freq_constant=10300.0)
    tokens = ids(2, 30, seed=8)
    cache, plains = KVCache.like(make_cache(model), rows=0), []
    for r, n in enumerate((4, 11)):
        one = make_cache(model)
        model_forward(model, one, tokens[r : r + 1, :n])
        cache.extend(one)
        plain = make_prompt_cache(model)
        model(tokens[r : r + 1, :n], cache=plain)
        plains.append(plain)
    lengths = [6, 3]
    chunk = mx.concatenate([tokens[0:1, 4:10], mx.concatenate([tokens[1:2, 11:14], mx.zeros((1, 3), mx.uint32)], 1)])
    logits = model_forward(model, cache, chunk, lengths)
    assert cache.positions == [10, 14] and logits.shape == (2, 6, model.args.vocab_size)
    assert _close(model(tokens[0:1, 4:10], cache=plains[0]), logits[0:1])
    assert _close(model(tokens[1:2, 11:14], cache=plains[1]), logits[1:2, :3])
    assert mx.all(logits[1, 3:] == 0).item()
    step = mx.concatenate([tokens[0:1, 10:11], tokens[1:2, 14:15]])
    logits = model_forward(model, cache, step)
    for r, (a, b) in enumerate(((10, 11), (14, 15))):
        assert _close(model(tokens[r : r + 1, a:b], cache=plains[r]), logits[r : r + 1])


def test_the_batch_engine_falls_back_when_a_kernel_fails(monkeypatch, simulated_backend):
    # Issue #27, 6: a backend failure used to turn every server request into an error. Now the batched step falls
    # back like the single-sequence one: it warns once, and rows at different positions decode to what the model's
    # own forward pass gives each alone.
    for kernels in (CpuKernels, FastKernels):
        monkeypatch.setattr(kernels, "attend", lambda self, *a: _fails_when_evaluated(*a))
    model = _model(rope_freq_constant=10310.0 + BACKENDS.index(simulated_backend))  # a fresh plan: the patch traced
    prompts = [ids(1, n, seed=n)[0].tolist() for n in (3, 9, 20)]
    engine = BatchEngine(model)
    seqs = [Sequence(None, p, 6) for p in prompts]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seq in seqs[:2]:
            engine.add(seq)
        while engine.prefilling:
            engine.prefill(4)
        engine.decode()
        engine.add(seqs[2])  # joins a batch already running: its rows are at different positions
        while engine.prefilling or engine.running:
            engine.prefill(8)
            engine.decode()
    engine.close()
    assert len([w for w in caught if issubclass(w.category, DecodeFallbackWarning)]) == 1 and engine.step.fallback
    for seq, prompt in zip(seqs, prompts):
        alone = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=6,
                                             prompt_cache=make_prompt_cache(model))]
        assert seq.tokens == alone and seq.finish_reason == "length"
