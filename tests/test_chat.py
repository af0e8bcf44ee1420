"""Chat sessions through the API: the KV cache kept across turns, context limits, save/load, bad input."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache
from spm_util import train_spm
from tiny import tiny_args

from mlx_openelm import random_model
from mlx_openelm.chat import ChatSession, Notice, read_conversation
from mlx_openelm.chat_terminal import parse_command, run_command
from mlx_openelm.decode import DecodeStep
from mlx_openelm.tokenizer import INSTRUCT_CHAT_TEMPLATE, Tokenizer


@pytest.fixture
def fed(monkeypatch) -> list[int]:
    """How many tokens each forward pass of the decode step is given (what the model really sees)."""
    counts, run = [], DecodeStep._run

    def counting(self, cache, tokens, *args):
        counts.append(tokens.shape[1])
        return run(self, cache, tokens, *args)

    monkeypatch.setattr(DecodeStep, "_run", counting)
    return counts


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = train_spm(tmp_path_factory.mktemp("spm"))
    return Tokenizer.from_file(path, chat_template=INSTRUCT_CHAT_TEMPLATE)


def make_session(tokenizer, max_context=512, **kwargs) -> ChatSession:
    args = tiny_args(vocab_size=tokenizer.vocab_size, max_context_length=max_context)
    return ChatSession(random_model(args, dtype="float32"), tokenizer, **kwargs)


def say(session: ChatSession, text: str, **kwargs) -> tuple[str, list[Notice]]:
    events = list(session.reply(text, **kwargs))
    return "".join(e for e in events if isinstance(e, str)), [e for e in events if isinstance(e, Notice)]


def assert_cache_is_full_prefill(session: ChatSession) -> None:
    """The cache built turn by turn holds exactly what one prefill of ``session.tokens`` gives."""
    fresh, n = make_prompt_cache(session.model), len(session.tokens)
    session.model(mx.array(session.tokens)[None], cache=fresh)
    assert session.cache.offset == fresh[0].offset == n
    for kept, ref in zip([*session.cache.keys, *session.cache.values], [c.state[i] for i in (0, 1) for c in fresh]):
        assert mx.allclose(kept[..., :n, :], ref[..., :n, :], atol=1e-4).item()


def test_second_turn_prefills_only_its_new_tokens(tokenizer, fed):
    session = make_session(tokenizer, system="Be brief.")
    say(session, "Hello world!", max_tokens=12)
    first, cached = session.last_turn, list(session.tokens)
    assert first.prefilled == first.prompt_tokens and first.reused == 0
    so_far = first.prompt_tokens + first.generation_tokens - (first.finish_reason == "stop")  # EOS is not kept
    assert so_far - 1 <= len(cached) <= so_far  # the last sampled token may not have gone through the model yet

    fed.clear()
    say(session, "The capital of France is", max_tokens=12)
    second = session.last_turn
    # The new tokens are exactly the text the template appends: the end of the reply, the user turn, the cue.
    new_ids = tokenizer.encode("</s>\n<|user|>\nThe capital of France is</s>\n<|assistant|>\n", bos=False)
    assert second.prompt_tokens == so_far + len(new_ids)
    assert session.tokens[: len(cached)] == cached and session.tokens[so_far : second.prompt_tokens] == new_ids
    assert second.reused == len(cached) and second.prefilled == second.prompt_tokens - len(cached)
    assert second.prefilled <= len(new_ids) + 1 < second.prompt_tokens // 2
    # What the model was actually given: the new tokens, then one token per decode step.
    assert fed[0] <= second.prefilled
    assert sum(fed) <= second.prefilled + second.generation_tokens
    assert_cache_is_full_prefill(session)


# A template whose assistant turn ends in text that merges with the reply's last characters ("Hel" + "lo").
MERGING_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}lo"
                    "{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


def test_generated_ids_are_kept_not_re_encoded(tokenizer):
    # A reply spelled in byte pieces decodes to text that re-encodes to other ids, and the template's next text
    # merges with its end: a fresh encoding of the conversation would change the reply's tokens. The cache holds
    # the ids the model saw; the next turn must reuse them all and prefill only the new text.
    tok = Tokenizer(tokenizer.sp, chat_template=MERGING_TEMPLATE)
    script = [tok.sp.piece_to_id(f"<0x{ord(c):02X}>") for c in "Hel"] + [tok.eos_id]
    steps = iter(script)

    def scripted(logprobs):
        return mx.array([next(steps, tok.eos_id)])  # the step after EOS is queued before it is read

    session = make_session(tok)
    reply, _ = say(session, "Hello world!", max_tokens=32, sampler=scripted)
    assert reply == "Hel" and session.last_turn.finish_reason == "stop"
    first, kept = session.last_turn.prompt_tokens, len(script) - 1
    assert session.tokens[first:] == script[:-1]  # the generated ids, not an encoding of their text
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hello world!"},
                                        {"role": "assistant", "content": "Hel"}, {"role": "user", "content": "Go"}])
    assert tok.encode(rendered)[: first + kept] != session.tokens  # a fresh encoding differs from what was cached
    say(session, "Go", max_tokens=4)
    turn = session.last_turn
    assert turn.reused == first + kept and turn.prefilled == turn.prompt_tokens - turn.reused
    before = tok.apply_chat_template([{"role": "user", "content": "Hello world!"}]) + "Hel"
    assert turn.prefilled == len(tok.encode(rendered[len(before) :], bos=False))
    assert_cache_is_full_prefill(session)


@pytest.mark.parametrize("system", [None, "Be brief."], ids=["no-system", "system"])
@pytest.mark.parametrize(("template", "new_text"), [
    (None, "\n\n{}"), (INSTRUCT_CHAT_TEMPLATE, "</s>\n<|user|>\n{}</s>\n<|assistant|>\n")], ids=["base", "instruct"])
def test_each_turn_prefills_only_its_new_message(tokenizer, template, new_text, system, tmp_path):
    # The conversation is rendered as the model saw it, turn after turn: a turn's prompt is everything the model
    # was given or generated so far (the generated ids as sampled), then the new message with the format's
    # separators (``new_text``), and only that goes through the model. A base model (no template) continues the
    # text: its reply follows the message it answers directly, with the space SentencePiece drops at a text's start.
    tok = Tokenizer(tokenizer.sp, chat_template=template)
    script: list[int] = []

    def scripted(logprobs):
        return mx.array([script.pop(0) if script else tok.eos_id])  # EOS once the script is out

    session = make_session(tok, system=system)
    seen: list[int] = []  # what the model was given or generated so far
    turns = [("The capital of France is", "Paris.", "stop"), ("Hello world!", "Hello, world.", "length"),
             ("for i in range(10):", "print(i * 2)", "stop")]
    for i, (message, reply, finish) in enumerate(turns):
        reply_ids, held = tok.encode(reply, bos=False), list(session.tokens)
        script[:] = reply_ids + [tok.eos_id] * (finish == "stop")
        steps = len(script)
        before = tok.apply_chat_template(session.messages[:-1]) + session.messages[-1]["content"] if i else ""
        shown, _ = say(session, message, max_tokens=steps, sampler=scripted)
        turn = session.last_turn
        rendered = tok.apply_chat_template(session.messages[:-1])
        prompt = tok.encode(rendered)
        assert shown == reply and turn.finish_reason == finish and turn.generation_tokens == steps
        assert session.messages[-1] == {"role": "assistant", "content": (" " if template is None else "") + reply}
        if i:
            assert rendered == before + new_text.format(message)  # only the new message and its separators
            new_ids = prompt[len(tok.encode(before)) :]
            assert session.tokens[: turn.prompt_tokens] == seen + new_ids
            assert held == seen[: len(held)] and len(seen) - 1 <= len(held)  # the last sampled id may be unfed
            assert turn.reused == len(held) and turn.prefilled == len(new_ids) + len(seen) - len(held)
        else:
            assert turn.prefilled == turn.prompt_tokens and session.tokens[: turn.prompt_tokens] == prompt
        kept = session.tokens[turn.prompt_tokens :]  # the reply's ids as generated (the last may be unfed)
        assert kept == reply_ids[: len(kept)] and len(kept) >= len(reply_ids) - 1
        seen = session.tokens[: turn.prompt_tokens] + reply_ids  # the generated ids, not their text re-encoded
        if template is None:  # no template: the rendering encodes to exactly the ids the model saw
            assert tok.encode(rendered + session.messages[-1]["content"]) == seen
    assert_cache_is_full_prefill(session)

    # Saved and loaded, it renders the same; for a base model a fresh cache then prefills the very ids the model saw.
    other = make_session(tok)
    other.load(session.save(tmp_path / "chat.json"))
    assert other.messages == session.messages
    if template is None:
        for s in (session, other):
            script[:] = [tok.eos_id]
            say(s, "Bye.", sampler=scripted)
        assert other.last_turn.reused == 0 and other.tokens == session.tokens


def test_context_fills_old_turns_are_dropped_and_chat_keeps_answering(tokenizer):
    session = make_session(tokenizer, max_context=96, system="Be brief.")
    notices, turns = [], 0
    for i in range(10):
        _, got = say(session, f"Question number {i}: for i in range(10)?", max_tokens=16)
        notices += got
        turns += 1
        stats = session.last_turn
        assert stats.generation_tokens >= 1 and stats.prompt_tokens + stats.generation_tokens <= 96
        assert session.messages[0] == {"role": "system", "content": "Be brief."}
        assert session.messages[-2]["content"] == f"Question number {i}: for i in range(10)?"
        if got:  # the cache was rebuilt from the system prompt on
            assert 0 < stats.reused < stats.prompt_tokens
        assert_cache_is_full_prefill(session)
    assert notices and "dropped the oldest" in notices[0].text
    assert len(session.messages) < 1 + 2 * turns


def test_interrupted_reply_is_kept_and_next_turn_reuses_it(tokenizer):
    session = make_session(tokenizer)
    events = session.reply("Hello world!", max_tokens=200)
    pieces = [next(events) for _ in range(3)]
    events.close()  # what the terminal does on Ctrl-C
    stats = session.last_turn
    assert stats.finish_reason == "interrupted" and 3 <= stats.generation_tokens < 200
    assert session.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
    assert_cache_is_full_prefill(session)
    kept = len(session.tokens)
    say(session, "Go on.", max_tokens=4)
    assert session.last_turn.reused == kept


def test_ctrl_c_landing_inside_a_decode_step_leaves_a_consistent_session(tokenizer):
    session = make_session(tokenizer)
    calls = []

    def interrupt_on_sixth_step(tokens, logits):  # where a forced Ctrl-C's KeyboardInterrupt may land
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return logits

    with pytest.raises(KeyboardInterrupt):
        say(session, "Hello world!", max_tokens=50, logits_processors=[interrupt_on_sixth_step])
    assert session.last_turn.finish_reason == "interrupted" and 1 <= session.last_turn.generation_tokens < 6
    assert session.messages[0]["content"] == "Hello world!" and session.messages[1]["role"] == "assistant"
    assert_cache_is_full_prefill(session)
    say(session, "Go on.", max_tokens=4)
    assert session.last_turn.reused == session.last_turn.prompt_tokens - session.last_turn.prefilled > 0
    assert_cache_is_full_prefill(session)


def test_save_and_load_round_trip(tokenizer, tmp_path):
    session = make_session(tokenizer, system="Be brief.")
    say(session, "Hello world!", max_tokens=6)
    say(session, "Numbers 1234567890?", max_tokens=6)
    path = session.save(tmp_path / "chat.json")
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]  # no temporary file left behind
    record = json.loads(path.read_text())
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert record["messages"][3]["content"] == "Numbers 1234567890?"

    other = make_session(tokenizer)
    other.load(path)
    assert other.messages == session.messages and other.system == "Be brief."
    say(other, "More?", max_tokens=4)
    assert other.last_turn.reused == 0 and other.last_turn.prefilled > 30  # a fresh cache: all is prefilled
    assert_cache_is_full_prefill(other)

    # Loading into a session whose cache shares a prefix with the file keeps that prefix.
    session.reset()
    say(session, "Hi", max_tokens=4)
    session.load(path)
    say(session, "More?", max_tokens=4)
    assert 0 < session.last_turn.reused < session.last_turn.prompt_tokens
    assert_cache_is_full_prefill(session)


def test_reset_and_system_prompt(tokenizer):
    session = make_session(tokenizer, system="Be brief.")
    say(session, "Hello world!", max_tokens=6)
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    say(session, "Hello world!", max_tokens=6)
    assert session.last_turn.reused > 0  # the system prompt's tokens stay cached
    session.set_system("Be verbose.")
    assert session.system == "Be verbose." and len(session.messages) == 3
    session.set_system(None)
    assert session.system is None and session.messages[0]["role"] == "user"


def test_bad_input_is_a_one_line_error_and_the_session_goes_on(tokenizer, tmp_path):
    session = make_session(tokenizer, max_context=64)
    for line in ["/bogus", "/save", "/load", "/reset now"]:
        with pytest.raises(ValueError, match=r"^/|unknown command"):
            parse_command(line)
    assert parse_command("//etc is a folder") is None and parse_command("/save a b.json") == ("save", "a b.json")

    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "shape.json").write_text(json.dumps({"messages": [{"role": "wizard", "content": "x"}]}))
    with pytest.raises(ValueError, match="not a saved chat"):
        read_conversation(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not a saved chat"):
        read_conversation(tmp_path / "shape.json")
    with pytest.raises(FileNotFoundError, match="no such file"):
        run_command(session, "load", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="does not fit"):
        say(session, "Hello world! " * 40)
    assert session.messages == []

    with pytest.raises(ValueError, match="failed to render .TemplateError: no chats here"):
        Tokenizer(tokenizer.sp, chat_template="{{ raise_exception('no chats here') }}")  # fails when loaded
    picky = "{% for m in messages %}{% if m['content'] == 'Hi' %}{{ 1 / 0 }}{% endif %}{{ m['content'] }}{% endfor %}"
    broken = ChatSession(session.model, Tokenizer(tokenizer.sp, chat_template=picky))
    with pytest.raises(ValueError, match="failed to render .ZeroDivisionError"):
        say(broken, "Hi")
    assert broken.messages == []
    say(session, "Hello", max_tokens=4)
    assert session.last_turn.generation_tokens >= 1 and len(session.messages) == 2
