"""Speculative decoding: exact against plain decoding (greedy), in distribution (sampling), caches kept right."""

import itertools

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from tiny import tiny_args
from trained_model import load_checkpoint

from mlx_openelm import generate_step, make_cache, make_logits_processors, make_sampler, random_model, stream_generate
from mlx_openelm.speculative import PromptLookup, SpeculativeStats
from mlx_openelm.tokenizer import Tokenizer

DRAFT_ARGS = dict(num_transformer_layers=2, num_query_heads=[4, 4], num_kv_heads=[1, 1], ffn_multipliers=[0.5, 1.0])


def _prompt(n=20, seed=0, vocab=128):
    return mx.array(np.random.default_rng(seed).integers(0, vocab, (n,)), dtype=mx.uint32)


def _tokens(steps):
    return [t for t, _ in steps]


def _assert_cache_holds(model, cache, ids):
    # The cache built pass by pass, with rejected positions trimmed, equals one prefill of exactly ``ids``.
    fresh, n = make_prompt_cache(model), len(ids)
    model(mx.array(ids)[None], cache=fresh)
    assert cache.offset == fresh[0].offset == n
    for kept, ref in zip([*cache.keys, *cache.values], [c.state[i] for i in (0, 1) for c in fresh]):
        assert mx.allclose(kept[..., :n, :], ref[..., :n, :], atol=1e-4).item()


@pytest.fixture(scope="module")
def memorizer(trained_checkpoint):
    t = trained_checkpoint
    return load_checkpoint(t.path), Tokenizer.from_file(t.path / "tokenizer.model"), t


@pytest.fixture(scope="module")
def pair(memorizer):
    # The memorizing model (it recites its text, then varied text) and its own 3-bit copy as the draft: they agree
    # on about half the drafts, so passes see acceptance, rejection and cache rewinds.
    model, _, t = memorizer
    draft = load_checkpoint(t.path)
    nn.quantize(draft, group_size=32, bits=3)
    mx.eval(draft.parameters())
    return model, draft, mx.array(t.prompt_ids)


@pytest.mark.parametrize("penalty", [None, 1.3])
@pytest.mark.parametrize("mode", ["draft", "lookup"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_output_is_plain_greedy_for_256_tokens(pair, k, mode, penalty):
    target, draft, prompt = pair
    procs = make_logits_processors(penalty, 32) if penalty else None
    plain = _tokens(generate_step(prompt, target, max_tokens=256, logits_processors=procs))
    cache, draft_cache, stats = make_cache(target), make_cache(draft), SpeculativeStats()
    kw = {"draft_model": draft, "draft_cache": draft_cache} if mode == "draft" else {"prompt_lookup": 2}
    spec = _tokens(generate_step(prompt, target, max_tokens=256, logits_processors=procs, num_draft_tokens=k,
                                 prompt_cache=cache, stats=stats, **kw))
    assert spec == plain and len(set(plain)) > 30
    assert 0 < stats.accepted < stats.drafted and 256 <= stats.passes + stats.accepted <= 256 + k
    kept = prompt.tolist() + plain[:-1]  # as after plain decoding: the last token is never fed back
    _assert_cache_holds(target, cache, kept)
    if mode == "draft":
        _assert_cache_holds(draft, draft_cache, kept)


def _drafted(runs: list[int], index: int) -> bool:
    """Whether generated token ``index`` was an accepted draft (not the token a pass adds itself)."""
    start = 0
    for accepted in runs:
        if index <= start + accepted:
            return index < start + accepted
        start += accepted + 1
    return False


@pytest.mark.parametrize("mode", ["draft", "lookup"])
@pytest.mark.parametrize("cut", ["eos", "stop", "max_tokens"])
def test_cuts_inside_an_accepted_run_match_plain_decoding(memorizer, mode, cut):
    # The memorizing model drafts for itself (every draft accepted); for prompt lookup the prompt is the start of
    # its own greedy output, whose later stretches repeat earlier ones. The cut (EOS, a stop string, max_tokens)
    # is placed on a token that an accepted draft produced, and every response must equal plain decoding's.
    model, tok, t = memorizer
    k, spec_kw = 8, ({"draft_model": model} if mode == "draft" else {"prompt_lookup": 1})
    if mode == "draft":
        prompt = t.prompt_ids
    else:
        recited = _tokens(generate_step(mx.array(t.prompt_ids), model, max_tokens=136))
        prompt = t.prompt_ids + recited
    plain = list(stream_generate(model, tok, prompt, max_tokens=200))
    probe = SpeculativeStats()
    list(generate_step(mx.array(prompt), model, max_tokens=len(plain), num_draft_tokens=k, stats=probe, **spec_kw))
    if cut == "eos":
        assert plain[-1].finish_reason == "stop" and plain[-1].token == tok.eos_id
        index, kw = len(plain) - 1, {"max_tokens": 200}
    else:
        index = next(i for i in range(3, len(plain) - 1) if _drafted(probe.runs, i) and plain[i].text.strip())
        text = "".join(r.text for r in plain[: index + 1])
        kw = {"max_tokens": index + 1} if cut == "max_tokens" else {"max_tokens": 200, "stop": [text[-4:]]}
        if cut == "stop":
            assert text.find(text[-4:]) == len(text) - 4, "the stop string must first occur at the cut"
    assert _drafted(probe.runs, index), "the cut must fall inside an accepted run"
    expected = [(r.text, r.token, r.finish_reason) for r in stream_generate(model, tok, prompt, **kw)]
    spec = list(stream_generate(model, tok, prompt, num_draft_tokens=k, **kw, **spec_kw))
    assert [(r.text, r.token, r.finish_reason) for r in spec] == expected
    assert expected[-1][2] == ("length" if cut == "max_tokens" else "stop") and len(expected) == index + 1


@pytest.mark.parametrize("mode", ["draft", "lookup"])
def test_the_context_limit_cuts_as_in_plain_decoding(mode):
    model = random_model(tiny_args(max_context_length=48), dtype="float32", seed=0)
    prompt = _prompt()
    plain = _tokens(generate_step(prompt, model, max_tokens=100))
    kw = {"draft_model": model} if mode == "draft" else {"prompt_lookup": 1}
    assert len(plain) == 48 - 20 and _tokens(generate_step(prompt, model, max_tokens=100, num_draft_tokens=8,
                                                           **kw)) == plain


def test_prompt_lookup_drafts_what_followed_the_last_ngram():
    lookup = PromptLookup(2)
    lookup.extend([5, 6, 7, 8, 9, 5, 6])
    assert lookup.lookup(3) == [7, 8, 9]
    lookup.extend([1, 2])
    assert lookup.lookup(3) == []  # (1, 2) never occurred before
    lookup.extend([5, 6])
    assert lookup.lookup(2) == [1, 2]  # the latest earlier occurrence of (5, 6)
    repeat = PromptLookup(1)
    repeat.extend([4, 4, 4, 4])
    assert repeat.lookup(2) == [4, 4]  # the latest occurrence is followed by one token only: an earlier one


def test_bad_drafts_are_one_clear_error_before_any_work():
    target = random_model(tiny_args(), dtype="float32")
    other_vocab = random_model(tiny_args(vocab_size=64, **DRAFT_ARGS), "float32")
    cases = [({"draft_model": other_vocab}, "vocabulary of 64 tokens"),
             ({"draft_model": target, "prompt_lookup": 2}, "not both"),
             ({"prompt_lookup": 0}, "prompt_lookup must be"),
             ({"draft_model": target, "num_draft_tokens": 0}, "num_draft_tokens must be"),
             ({"prompt_lookup": 2, "max_kv_size": 64}, "plain KV cache"),
             ({"prompt_lookup": 2, "sampler": lambda lp: mx.argmax(lp, -1)}, "sampler from make_sampler")]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            next(generate_step(_prompt(), target, **kw))


VOCAB = 16


def _exact_marginals(model, prompt, sampler, length):
    """The target's own sampling distribution of each of the next ``length`` tokens, by enumeration."""
    joint = np.ones([1])
    for n in range(length):
        seqs = list(itertools.product(range(VOCAB), repeat=n))
        rows = mx.array([prompt + list(s) for s in seqs]) if seqs and n else mx.array([prompt])
        logits = model(rows)[:, -1].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        step = np.array(mx.softmax(sampler.logits(logprobs), axis=-1))  # [prefixes, vocab]
        joint = (joint.reshape(-1, 1) * step).reshape(-1)
    joint = joint.reshape([VOCAB] * length)
    return [joint.sum(axis=tuple(a for a in range(length) if a != i)) for i in range(length)]


def test_speculative_sampling_keeps_the_target_distribution():
    # Each of the first three sampled tokens, over 1200 runs with K = 2 (so they come from accepted drafts, from
    # the residual max(0, p - q) and from the bonus draw): its empirical distribution against the target's exact
    # one. Total variation measured 0.041 (about what 1200 samples give); the bound 0.1 fails a rule that accepts
    # every draft (measured 0.70) or redraws a rejected token from p instead of the residual (0.15).
    target = random_model(tiny_args(vocab_size=VOCAB), dtype="float32", seed=3)
    draft = random_model(tiny_args(vocab_size=VOCAB, **DRAFT_ARGS), dtype="float32", seed=4)
    for m in (target, draft):  # smaller embeddings: flat next-token distributions (top 0.2-0.26), far apart
        m.transformer.token_embeddings.weight = m.transformer.token_embeddings.weight * 0.3  # (TV(p, q) 0.6-0.7)
        mx.eval(m.parameters())
    prompt = [1, 5, 9]
    sampler = make_sampler(temp=1.0, top_k=12, seed=0)
    exact = _exact_marginals(target, prompt, make_sampler(temp=1.0, top_k=12), 3)
    counts = np.zeros((3, VOCAB))
    runs = 1200
    for _ in range(runs):
        out = _tokens(generate_step(mx.array(prompt), target, max_tokens=3, sampler=sampler, draft_model=draft,
                                    num_draft_tokens=2))
        counts[np.arange(3), out] += 1
    tv = [0.5 * np.abs(counts[i] / runs - exact[i]).sum() for i in range(3)]
    assert max(tv) < 0.1, tv


@pytest.mark.parametrize("spec", [{"draft": True}, {"prompt_lookup": 2}])
def test_chat_turns_decode_speculatively_with_the_same_replies(memorizer, spec):
    # Two turns: the draft model's cache is kept in step with the target's across them.
    from mlx_openelm.chat import ChatSession
    from mlx_openelm.tokenizer import INSTRUCT_CHAT_TEMPLATE

    model, tok, t = memorizer
    tok = Tokenizer(tok.sp, chat_template=INSTRUCT_CHAT_TEMPLATE)
    plain = ChatSession(model, tok)
    kw = {"draft_model": model} if spec.get("draft") else {"prompt_lookup": spec["prompt_lookup"]}
    fast = ChatSession(model, tok, num_draft_tokens=4, **kw)
    for message in (t.prompt, "And then?"):
        assert "".join(plain.reply(message, max_tokens=40)) == "".join(fast.reply(message, max_tokens=40))
        assert fast.tokens == plain.tokens
    from mlx_openelm.chat_terminal import format_stats

    # --verbose shows the speculative figures (a draft equal to the target accepts every drafted token)
    assert plain.last_turn.acceptance_rate is None and "accepted" not in format_stats(plain.last_turn)
    assert 0 < fast.last_turn.acceptance_rate <= 1 and fast.last_turn.tokens_per_pass >= 1
    assert "of drafted tokens accepted" in format_stats(fast.last_turn)
    if spec.get("draft"):
        assert fast.draft_cache.offset == fast.cache.offset == len(fast.tokens)
