import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm import make_logits_processors, make_sampler

LOGITS = mx.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
DRAWS = 40_000


def _logprobs(logits=LOGITS):
    return logits - mx.logsumexp(logits, keepdims=True)


def _frequencies(sampler, logits=LOGITS):
    rows = mx.broadcast_to(_logprobs(logits), (DRAWS, logits.size))
    tokens = np.array(sampler(rows))
    return np.bincount(tokens, minlength=logits.size) / DRAWS


def _expected(keep, temp=1.0):
    p = np.exp(np.array(LOGITS) / temp) * keep
    return p / p.sum()


def _assert_matches(freq, expected):
    assert (freq[expected == 0] == 0).all(), f"filtered tokens were drawn: {freq}"
    sigma = np.sqrt(expected * (1 - expected) / DRAWS)
    assert (np.abs(freq - expected) <= 5 * sigma + 1e-9).all(), f"{freq} vs {expected}"


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"temp": -0.1}, "temp must be a number >= 0"),
        ({"top_p": -0.5}, "top_p must be in [0, 1]"),
        ({"top_p": 1.5}, "top_p must be in [0, 1]"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_k": 2.5}, "top_k must be an integer >= 0"),
        ({"min_p": 1.1}, "min_p must be in [0, 1]"),
        ({"seed": -3}, "seed must be an integer >= 0"),
    ],
)
def test_bad_sampler_arguments_name_the_value(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        make_sampler(**{"temp": 1.0, **kwargs})
    assert fragment in str(e.value) and repr(next(iter(kwargs.values()))) in str(e.value)


@pytest.mark.parametrize("kwargs", [{"repetition_penalty": 0.0}, {"repetition_penalty": -1.2},
                                    {"repetition_penalty": 1.2, "repetition_context_size": 0}])
def test_bad_processor_arguments(kwargs):
    with pytest.raises(ValueError, match="must be"):
        make_logits_processors(**kwargs)


def test_temperature_zero_is_argmax():
    rows = mx.random.normal((16, 50), key=mx.random.key(1))
    assert mx.array_equal(make_sampler()(rows), mx.argmax(rows, axis=-1))


def test_top_k_one_is_greedy():
    rows = _logprobs(mx.random.normal((64, 50), key=mx.random.key(2)))
    assert mx.array_equal(make_sampler(temp=1.5, top_k=1, seed=0)(rows), mx.argmax(rows, axis=-1))


def test_same_seed_same_draws_and_other_seeds_differ():
    rows = mx.broadcast_to(_logprobs(), (64, LOGITS.size))

    def draws(seed):
        sampler = make_sampler(temp=1.0, seed=seed)
        return [sampler(rows).tolist() for _ in range(3)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    first, second, _ = draws(7)
    assert first != second  # the key advances between calls


def test_temperature_distribution():
    _assert_matches(_frequencies(make_sampler(temp=0.7, seed=1)), _expected(np.ones(8), temp=0.7))


def test_top_k_distribution():
    keep = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    _assert_matches(_frequencies(make_sampler(temp=1.0, top_k=3, seed=2)), _expected(keep))


@pytest.mark.parametrize("kwargs", [{"top_k": 8}, {"top_p": 0.0}, {"top_p": 1.0}, {"min_p": 0.0}])
def test_filters_that_keep_everything(kwargs):
    _assert_matches(_frequencies(make_sampler(temp=1.0, seed=3, **kwargs)), _expected(np.ones(8)))


def test_top_p_distribution():
    p = _expected(np.ones(8))
    # Smallest prefix of the sorted distribution whose mass reaches 0.75.
    n = int(np.searchsorted(np.cumsum(p), 0.75) + 1)
    keep = np.array([1] * n + [0] * (8 - n))
    assert 1 < n < 8
    _assert_matches(_frequencies(make_sampler(temp=1.0, top_p=0.75, seed=4)), _expected(keep))


def test_min_p_distribution():
    # Keeps tokens whose probability is at least 0.2 x the top one's: logit >= 2 + ln 0.2 = 0.39.
    keep = (np.array(LOGITS) >= 2 + math.log(0.2)).astype(float)
    assert keep.sum() == 4
    _assert_matches(_frequencies(make_sampler(temp=1.0, min_p=0.2, seed=5)), _expected(keep))


def test_filters_apply_after_temperature():
    # At temperature 3 the distribution is flatter, so top-p 0.8 keeps more tokens than at temperature 1.
    p = _expected(np.ones(8), temp=3.0)
    n = int(np.searchsorted(np.cumsum(p), 0.8) + 1)
    freq = _frequencies(make_sampler(temp=3.0, top_p=0.8, seed=6))
    _assert_matches(freq, _expected(np.array([1] * n + [0] * (8 - n)), temp=3.0))


def test_repetition_penalty_scales_seen_logits_by_sign():
    (processor,) = make_logits_processors(repetition_penalty=2.0, repetition_context_size=2)
    logits = mx.array([[4.0, -4.0, 4.0, -4.0, 1.0]])
    out = processor(mx.array([0, 1, 3]), logits)  # context 2: only tokens 1 and 3 count
    assert out.tolist() == [[4.0, -8.0, 4.0, -8.0, 1.0]]


def test_no_penalty_no_processor():
    assert make_logits_processors() == [] and make_logits_processors(repetition_penalty=1.0) == []
