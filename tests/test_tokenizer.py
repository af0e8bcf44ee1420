"""Tokenizer wrapper, chat templates, and the Hugging Face files, on a SentencePiece model trained here."""

import hashlib
import json
import sys

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb
from spm_util import HARD_STRINGS, train_spm, varied_strings

from mlx_openelm.tokenizer import INSTRUCT_CHAT_TEMPLATE, Tokenizer
from mlx_openelm.tokenizer_fetch import TokenizerUnavailable, ensure_tokenizer, load_tokenizer

CHAT = [
    {"role": "system", "content": "SYSTEM"},
    {"role": "user", "content": "HELLO"},
    {"role": "assistant", "content": "REPLY"},
    {"role": "user", "content": "Q2"},
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def sp(model_path):
    return spm.SentencePieceProcessor(model_file=str(model_path))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, model_path):
    """A directory made by ensure_tokenizer from a source directory holding the trained model."""
    dest = tmp_path_factory.mktemp("converted")
    assert ensure_tokenizer(dest, source_dir=model_path.parent, instruct=True) == dest / "tokenizer.model"
    return dest


def test_encode_prepends_bos_and_matches_sentencepiece(model_path, sp):
    tok = Tokenizer.from_file(model_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, sp.vocab_size())
    for text in HARD_STRINGS:
        assert tok.encode(text) == [1] + sp.encode(text)
        assert tok.encode(text, bos=False) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == text


def test_literal_special_pieces_become_their_ids(model_path, sp):
    tok = Tokenizer.from_file(model_path)
    # Each stretch between special pieces is encoded on its own, dummy space prefix included.
    assert tok.encode("a</s>\nb") == [1] + sp.encode("a") + [2] + sp.encode("\nb")
    assert tok.encode("<s>x<unk>") == [1] + sp.encode("x") + [0]  # text that starts with <s> gets no second BOS
    assert tok.encode("</s>", bos=False) == [2]
    assert sp.encode("</s>") != [2]  # why the split is needed


def test_bad_tokenizer_files(tmp_path, model_path):
    with pytest.raises(FileNotFoundError, match="tokenizer fetch"):
        Tokenizer.from_file(tmp_path / "missing.model")
    (tmp_path / "corrupt.model").write_bytes(b"\x00not a model proto" * 10)
    with pytest.raises(ValueError, match="not a valid SentencePiece model") as e:
        Tokenizer.from_file(tmp_path / "corrupt.model")
    assert "\n" not in str(e.value)
    proto = pb.ModelProto.FromString(model_path.read_bytes())
    proto.trainer_spec.bos_id = -1
    proto.pieces[1].type = pb.ModelProto.SentencePiece.NORMAL
    (tmp_path / "nobos.model").write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match="no BOS"):
        Tokenizer.from_file(tmp_path / "nobos.model")


def test_instruct_template_renders_zephyr_format(model_path, sp):
    tok = Tokenizer.from_file(model_path, INSTRUCT_CHAT_TEMPLATE)
    expected = "<s><|system|>\nSYSTEM</s>\n<|user|>\nHELLO</s>\n<|assistant|>\nREPLY</s>\n<|user|>\nQ2</s>\n"
    assert tok.apply_chat_template(CHAT) == expected + "<|assistant|>\n"
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == expected
    ids = tok.encode(tok.apply_chat_template(CHAT[:2]))
    assert ids == [1] + sp.encode("<|system|>\nSYSTEM") + [2] + sp.encode("\n<|user|>\nHELLO") + [2] + sp.encode(
        "\n<|assistant|>\n")
    with pytest.raises(ValueError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_base_model_prompt_is_plain_completion(model_path):
    tok = Tokenizer.from_file(model_path)
    assert tok.apply_chat_template([{"role": "user", "content": "The capital of France is"}]) == (
        "The capital of France is")
    assert tok.apply_chat_template(CHAT[:2]) == "SYSTEM\n\nHELLO"
    # A reply follows the text it continues; the blank line goes before each new message. So every prompt plus its
    # reply starts the next prompt, and there is no cue for the reply to come.
    assert tok.apply_chat_template(CHAT) == "SYSTEM\n\nHELLOREPLY\n\nQ2"
    for n in range(1, len(CHAT) + 1):
        assert tok.apply_chat_template(CHAT[:n], add_generation_prompt=False) == tok.apply_chat_template(CHAT[:n])
        assert tok.apply_chat_template(CHAT).startswith(tok.apply_chat_template(CHAT[:n]))
    assert tok.apply_chat_template(CHAT[1:]) == "HELLOREPLY\n\nQ2"


def test_decode_as_continuation_keeps_the_leading_space(model_path, sp):
    tok = Tokenizer.from_file(model_path)
    ids = tok.encode("Paris. Hello world!", bos=False)
    assert sp.id_to_piece(ids[0]).startswith("\u2581")
    assert tok.decode(ids) == "Paris. Hello world!" and tok.decode(ids, continuation=True) == " Paris. Hello world!"
    assert tok.decode([tok.bos_id, *ids], continuation=True) == " Paris. Hello world!"  # a control id first
    for text in HARD_STRINGS:  # what follows "x" decodes to exactly what "x" + it decodes to
        ids = tok.encode(text, bos=False)
        assert "x" + tok.decode(ids, continuation=True) == tok.decode(tok.encode("x", bos=False) + ids)


def test_load_tokenizer_template_sources(tmp_path, converted):
    assert load_tokenizer(converted).chat_template == INSTRUCT_CHAT_TEMPLATE
    custom = tmp_path / "t.jinja"
    custom.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    assert load_tokenizer(converted, custom).apply_chat_template(CHAT[1:2]) == "[user] HELLO\n"
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ValueError, match=r"bad chat template in .*bad\.jinja: line 1") as e:
        load_tokenizer(converted, bad)
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="chat template file not found"):
        load_tokenizer(converted, tmp_path / "nope.jinja")
    with pytest.raises(FileNotFoundError, match="tokenizer fetch"):
        load_tokenizer(tmp_path)


def test_tokenizer_json_encodes_like_sentencepiece(converted, sp):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(converted / "tokenizer.json"))
    texts = varied_strings(10_000) + HARD_STRINGS
    mismatches = [t for t in texts if hf.encode(t, add_special_tokens=False).ids != sp.encode(t)]
    assert mismatches == []
    assert hf.encode("Hello world").ids == [1] + sp.encode("Hello world")


def test_a_folder_with_only_tokenizer_json_gets_its_sentencepiece_model_back(tmp_path, converted, sp):
    # What mlx_lm.fuse leaves: tokenizer.json and the template, no tokenizer.model.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((converted / name).read_bytes())
    tok = load_tokenizer(tmp_path)
    texts = varied_strings(3_000) + HARD_STRINGS
    assert [tok.sp.encode(t) for t in texts] == [sp.encode(t) for t in texts]
    assert tok.chat_template == INSTRUCT_CHAT_TEMPLATE and tok.vocab_size == sp.vocab_size()
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizer.json this project can read"):
        load_tokenizer(tmp_path)


def test_transformers_and_mlx_lm_load_the_same_tokenizer(converted, sp):
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer
    from mlx_lm.tokenizer_utils import load as mlx_lm_load_tokenizer
    from transformers import AutoTokenizer

    config = json.loads((converted / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["chat_template"]) == ("<s>", "</s>",
                                                                                   INSTRUCT_CHAT_TEMPLATE)
    hf = AutoTokenizer.from_pretrained(str(converted))
    wrapper = mlx_lm_load_tokenizer(converted)
    assert isinstance(wrapper.detokenizer, SPMStreamingDetokenizer) and wrapper.eos_token_ids == {2}
    for text in HARD_STRINGS + varied_strings(300, seed=1):
        assert hf.encode(text) == [1] + sp.encode(text)
        assert wrapper.encode(text) == [1] + sp.encode(text)
    ours = load_tokenizer(converted)
    rendered = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == ours.apply_chat_template(CHAT)
    assert hf.encode(rendered, add_special_tokens=False) == ours.encode(rendered)


def test_ensure_tokenizer_refuses_bad_input(tmp_path, model_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerUnavailable) as e:
        ensure_tokenizer(tmp_path / "out", source_dir=tmp_path / "src")
    message = str(e.value)
    assert "not a valid SentencePiece model" in message and "--tokenizer PATH_OR_REPO" in message
    assert "\n" not in message
    with pytest.raises(TokenizerUnavailable, match=r"tried: source dir \(no tokenizer.model in .*\), "
                                                   r"--tokenizer \(not given\), rebuild \(disabled\);"):
        ensure_tokenizer(tmp_path / "out", source_dir=tmp_path, allow_rebuild=False)
    assert not (tmp_path / "out" / "tokenizer.model").exists()
    with pytest.raises(TokenizerUnavailable, match="no tokenizer.model in that folder"):
        ensure_tokenizer(tmp_path / "out", tokenizer=str(tmp_path))
    # A custom tokenizer given with --tokenizer is accepted (it is not Llama-2's vocabulary).
    assert ensure_tokenizer(tmp_path / "out", tokenizer=str(model_path)).read_bytes() == model_path.read_bytes()
    assert load_tokenizer(tmp_path / "out").chat_template is None  # a base model: no template stored


def test_hub_route_failure_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # The hub client reads HF_HUB_OFFLINE at import; offline mode makes this route fail at once, without retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(TokenizerUnavailable, match=r"^--tokenizer someone/some-model: .*tried: --tokenizer") as e:
        ensure_tokenizer(tmp_path, tokenizer="someone/some-model")
    assert "\n" not in str(e.value)
    with pytest.raises(TokenizerUnavailable, match="no such file, and not a Hugging Face repo id"):
        ensure_tokenizer(tmp_path, tokenizer="./no/such/file.model")


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the console entry point in-process; return (exit code, stdout, stderr)."""
    import cli

    monkeypatch.setattr(sys, "argv", ["mlx-openelm", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_fetch(tmp_path, model_path, monkeypatch, capsys):
    fetch = ("tokenizer", "fetch", "-o", str(tmp_path / "o"))
    code, out, err = run_cli(monkeypatch, capsys, *fetch, "--tokenizer", str(model_path))
    assert code == 0, err
    assert f"sha256 {hashlib.sha256(model_path.read_bytes()).hexdigest()}" in out
    assert "custom tokenizer (512 pieces)" in out and (tmp_path / "o" / "tokenizer.json").is_file()
    code, out, err = run_cli(monkeypatch, capsys, *fetch, "--from-file", str(tmp_path / "missing.tgz"))
    assert code == 1 and err.splitlines() == [f"error: --from-file {tmp_path / 'missing.tgz'}: no such file"]
