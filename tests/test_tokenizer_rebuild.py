"""Rebuilding Meta's Llama-2 tokenizer.model from public packages, and the acquisition routes.

Tests marked ``registry`` download the npm tarball (389 KB) and the PyPI sdist (77 MB) once per session and
skip, with the reason, only when the registry cannot be reached (or npm is not installed).
"""

import base64
import io
import shutil
import struct
import tarfile

import pytest
from spm_util import HARD_STRINGS, check_streaming_invariant, varied_strings

from mlx_openelm.llama_vocab import (
    GGUF_MEMBER,
    META_SHA256,
    NPM_MEMBER,
    build_model_proto,
    read_gguf_metadata,
    read_members,
    rebuild_from_artifact,
    sha256,
)
from mlx_openelm.tokenizer import Tokenizer
from mlx_openelm.tokenizer_fetch import (
    RegistryUnreachable,
    TokenizerUnavailable,
    download_npm,
    download_pypi,
    ensure_tokenizer,
    fetch_tokenizer,
)


def fake_llama_vocab() -> tuple[list[str], list[float], list[int]]:
    """A 32000-piece vocabulary laid out like Llama-2's, but not Meta's pieces."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [f"\u2581w{i}" for i in range(32000 - len(pieces))]
    return pieces, [0.0] * 259 + [-float(i) for i in range(32000 - 259)], [2, 3, 3] + [6] * 256 + [1] * 31741


def write_tar(path, name: str, data: bytes) -> None:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def gguf_bytes(kv: dict) -> bytes:
    """A minimal GGUF v3 file holding ``kv`` (strings, ints, floats, and lists of them) and no tensors."""
    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    def value(v) -> tuple[int, bytes]:
        if isinstance(v, str):
            return 8, string(v)
        if isinstance(v, float):
            return 6, struct.pack("<f", v)
        if isinstance(v, int):
            return 5, struct.pack("<i", v)
        kind = value(v[0])[0]
        return 9, struct.pack("<IQ", kind, len(v)) + b"".join(value(x)[1] for x in v)

    body = b"".join(string(k) + struct.pack("<I", value(v)[0]) + value(v)[1] for k, v in kv.items())
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + body


def test_gguf_reader_reads_vocab_metadata():
    kv = {"general.name": "x", "tokenizer.ggml.tokens": ["<unk>", "\u2581a", "日本"],
          "tokenizer.ggml.scores": [0.0, -1.5, -1e9], "tokenizer.ggml.token_type": [2, 1, 1], "n": 7}
    assert read_gguf_metadata(gguf_bytes(kv)) == kv
    with pytest.raises(ValueError, match="bad magic"):
        read_gguf_metadata(b"GGML" + bytes(20))


def test_wrong_vocabulary_is_refused(tmp_path):
    encoded = base64.b64encode("\n".join(fake_llama_vocab()[0]).encode()).decode()
    js = f'const llama_vocab_base64 = "{encoded}";'
    write_tar(tmp_path / "llama-tokenizer-js-1.2.2.tgz", NPM_MEMBER, js.encode())
    with pytest.raises(ValueError, match=f"has sha256 [0-9a-f]{{64}}, not Meta's {META_SHA256}"):
        rebuild_from_artifact(tmp_path / "llama-tokenizer-js-1.2.2.tgz")
    with pytest.raises(TokenizerUnavailable, match="not Meta's .*--tokenizer PATH_OR_REPO"):
        ensure_tokenizer(tmp_path / "out", tokenizer=str(tmp_path / "llama-tokenizer-js-1.2.2.tgz"))
    write_tar(tmp_path / "other.tar.gz", "README", b"nothing here")
    with pytest.raises(ValueError, match="holds neither"):
        rebuild_from_artifact(tmp_path / "other.tar.gz")


def test_a_32000_piece_model_must_be_meta_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(build_model_proto(*fake_llama_vocab()))
    with pytest.raises(TokenizerUnavailable, match="has Llama-2's 32000 pieces but sha256 .* \\(corrupt or modified"):
        ensure_tokenizer(tmp_path / "out", source_dir=tmp_path)


def test_unreachable_registries_are_reported(tmp_path, monkeypatch):
    # Real clients against a closed local port: both routes fail as "registry unreachable", in one line.
    monkeypatch.setenv("MLX_OPENELM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")
    monkeypatch.setenv("npm_config_fetch_retries", "0")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_RETRIES", "1")
    with pytest.raises(TokenizerUnavailable) as e:
        ensure_tokenizer(tmp_path / "out")
    message = str(e.value)
    npm_reason = "npm not found" if shutil.which("npm") is None else "registry unreachable"
    assert f"npm pack llama-tokenizer-js@1.2.2 ({npm_reason}" in message
    assert "pip download llama-cpp-python==0.3.36 (registry unreachable" in message
    assert "cache (empty" in message and "\n" not in message


def _download(download, directory):
    try:
        return download(directory)
    except RegistryUnreachable as e:
        pytest.skip(f"registry unreachable: {e}")
    except FileNotFoundError as e:
        pytest.skip(f"{e}: the npm route cannot run here")


@pytest.fixture(scope="session")
def npm_tarball(tmp_path_factory):
    return _download(download_npm, tmp_path_factory.mktemp("npm"))


@pytest.fixture(scope="session")
def pypi_sdist(tmp_path_factory):
    return _download(download_pypi, tmp_path_factory.mktemp("pypi"))


@pytest.fixture(scope="session")
def meta_dir(tmp_path_factory, pypi_sdist):
    """A directory holding Meta's rebuilt tokenizer.model and its Hugging Face files."""
    dest = tmp_path_factory.mktemp("meta")
    ensure_tokenizer(dest, tokenizer=str(pypi_sdist), instruct=True)
    return dest


@pytest.mark.registry
def test_npm_route_rebuilds_meta_file(npm_tarball, tmp_path):
    assert sha256(rebuild_from_artifact(npm_tarball)) == META_SHA256
    result = fetch_tokenizer(tmp_path, tokenizer=str(npm_tarball))
    assert result.sha256 == META_SHA256 and result.path.stat().st_size == 499_723


@pytest.mark.registry
def test_pypi_route_rebuilds_meta_file(pypi_sdist, meta_dir):
    assert sha256(rebuild_from_artifact(pypi_sdist)) == META_SHA256
    assert sha256((meta_dir / "tokenizer.model").read_bytes()) == META_SHA256


@pytest.mark.registry
def test_fetch_downloads_once_then_uses_the_cache(tmp_path, monkeypatch):
    if shutil.which("npm") is None:
        pytest.skip("npm not installed: the full download route would fetch the 77 MB sdist again")
    monkeypatch.setenv("MLX_OPENELM_CACHE", str(tmp_path / "cache"))
    try:
        first = fetch_tokenizer(tmp_path / "a")
    except TokenizerUnavailable as e:
        if "registry unreachable" in str(e):
            pytest.skip(f"registry unreachable: {e}")
        raise
    assert first.route.startswith("rebuilt from npm pack") and first.sha256 == META_SHA256
    assert (tmp_path / "cache" / "llama2" / "tokenizer.model").is_file()
    second = fetch_tokenizer(tmp_path / "b")
    assert second.route.startswith("cache ") and second.sha256 == META_SHA256


@pytest.mark.registry
def test_openelm_test_vectors(meta_dir):
    tok = Tokenizer.from_file(meta_dir / "tokenizer.model")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.encode("Hello world") == [1, 15043, 3186]
    assert tok.encode("The capital of France is") == [1, 450, 7483, 310, 3444, 338]
    assert tok.sp.encode("🦙", out_type=str) == ["\u2581", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]


def llama_cpp_cases(sdist) -> list[tuple[str, list[int]]]:
    """llama.cpp's test strings and expected ids (no BOS) for this vocabulary, shipped in the sdist."""
    files = read_members(sdist, [GGUF_MEMBER + ".inp", GGUF_MEMBER + ".out"])
    texts = files[GGUF_MEMBER + ".inp"].decode("utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    ids = [[int(t) for t in line.split()] for line in files[GGUF_MEMBER + ".out"].decode().split("\n")[:-1]]
    assert len(texts) == len(ids)
    return list(zip(texts, ids, strict=True))


@pytest.mark.registry
def test_matches_llama_cpp_expected_ids(pypi_sdist, meta_dir):
    from tokenizers import Tokenizer as HFTokenizer

    cases = llama_cpp_cases(pypi_sdist)
    # 46 strings, each ended by a separator, and 46 id lines (the "47" counts the empty tail).
    assert len(cases) == 46
    tok, hf = Tokenizer.from_file(meta_dir / "tokenizer.model"), HFTokenizer.from_file(str(meta_dir / "tokenizer.json"))
    assert [tok.encode(text, bos=False) for text, _ in cases] == [ids for _, ids in cases]
    assert [hf.encode(text, add_special_tokens=False).ids for text, _ in cases] == [ids for _, ids in cases]


@pytest.mark.registry
def test_meta_tokenizer_json_parity_and_streaming(meta_dir):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    tok, hf = Tokenizer.from_file(meta_dir / "tokenizer.model"), HFTokenizer.from_file(str(meta_dir / "tokenizer.json"))
    texts = varied_strings(10_000, seed=3) + HARD_STRINGS
    assert [t for t in texts if hf.encode(t).ids != tok.encode(t)] == []
    auto = AutoTokenizer.from_pretrained(str(meta_dir))
    assert [t for t in texts[:500] if auto.encode(t) != tok.encode(t)] == []
    check_streaming_invariant(tok, HARD_STRINGS)
