"""Today's outputs of the committed stand-ins, token for token: plain decoding, speculative decoding (draft model and
prompt lookup), the batch job and the real server give exactly what ``tests/data/recorded_outputs.json`` holds.

The cases and the code that computes them are in ``record_outputs.py`` (``python tests/record_outputs.py`` rewrites
the file; do that only for a change meant to alter outputs). A failure names the case and the first token that
differs.
"""

from __future__ import annotations

import json

import pytest
import record_outputs as rec

RECORDED = json.loads(rec.RECORD.read_text(encoding="utf-8"))
STATS = ("acceptance_rate", "tokens_per_pass")


@pytest.fixture(scope="module")
def models():
    return rec.load_models()


@pytest.fixture(scope="module")
def speculative(models):
    target, draft, tokenizer = models
    return rec.compute_speculative(target, draft, tokenizer)


@pytest.fixture(scope="module")
def prompt_lookup(models):
    target, _, tokenizer = models
    return rec.compute_prompt_lookup(target, tokenizer)


def _first_difference(got: list, want: list) -> str:
    i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"first difference at token {i} of {len(got)} (recorded {len(want)}): got {got[i:i + 4]}, " \
           f"recorded {want[i:i + 4]}"


def _check_runs(got: dict, want: dict, keys=("tokens", "text", "finish_reason")) -> None:
    assert sorted(got) == sorted(want)
    for case in want:
        assert got[case]["tokens"] == want[case]["tokens"], \
            f"{case}: {_first_difference(got[case]['tokens'], want[case]['tokens'])}"
        for key in keys:
            assert got[case][key] == want[case][key], f"{case}: {key}"


def test_plain_decoding_is_as_recorded(models):
    target, _, tokenizer = models
    _check_runs(rec.compute_generate(target, tokenizer), RECORDED["generate"])


def test_greedy_speculative_decoding_equals_plain_in_the_record():
    # The record itself: greedy drafting (with or without the penalty, cut by a stop string) is token for token the
    # plain decoding; only seeded sampling may differ.
    plain, drafted = RECORDED["generate"], RECORDED["speculative"]
    for case in plain:
        if not case.startswith("sampled"):
            assert drafted[case]["tokens"] == plain[case]["tokens"], case


def test_speculative_decoding_with_the_draft_is_as_recorded(speculative):
    _check_runs(speculative, RECORDED["speculative"])


def test_speculative_statistics_are_as_recorded(speculative):
    # How many drafts each pass kept: a refactor that verifies differently but yields the same tokens shows here.
    for case, want in RECORDED["speculative"].items():
        for key in STATS:
            assert speculative[case][key] == pytest.approx(want[key], abs=1e-12), f"{case}: {key}"


def test_prompt_lookup_is_as_recorded(prompt_lookup):
    _check_runs(prompt_lookup, RECORDED["prompt_lookup"])
    for case, want in RECORDED["prompt_lookup"].items():
        for key in STATS:
            assert prompt_lookup[case][key] == pytest.approx(want[key], abs=1e-12), f"{case}: {key}"
    assert all(want["acceptance_rate"] > 0 for want in RECORDED["prompt_lookup"].values())  # lookup did draft


def test_the_batch_job_writes_the_recorded_lines(models, tmp_path):
    target, _, tokenizer = models
    got = rec.compute_batch(target, tokenizer, tmp_path)
    assert [line["id"] for line in got] == [line["id"] for line in RECORDED["batch"]]
    for line, want in zip(got, RECORDED["batch"]):
        assert line == want, line["id"]


def test_the_server_answers_as_recorded(tmp_path):
    got = rec.compute_server(tmp_path)
    for n, (reply, want) in enumerate(zip(got["completions"], RECORDED["server"]["completions"])):
        assert reply == want, f"completion {n}"
    assert len(got["completions"]) == len(RECORDED["server"]["completions"])
    assert got["chat"] == RECORDED["server"]["chat"]
