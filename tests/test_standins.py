"""The committed stand-ins (``standins/``): they convert like Apple's checkpoints, run through every front-end, load
in mlx-lm, and the converted target scores the held-out test piece as recorded (within 2%)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STANDINS = REPO / "standins"
sys.path.insert(0, str(STANDINS))
import corpus  # noqa: E402

SCRIPT = str(Path(sys.executable).with_name("mlx-openelm"))
EVALUATION = STANDINS / "evaluation.json"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    out = {}
    for name in ("target", "draft"):
        out[name] = root / name
        p = subprocess.run([SCRIPT, "convert", str(STANDINS / f"openelm-stdlib-{name}"), "-o", str(out[name])],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
    return out


def test_they_are_openelms_of_the_promised_sizes(converted):
    from mlx_openelm import load_model
    from mlx_openelm.bench import parameter_count

    sizes = {}
    for name, folder in converted.items():
        args = load_model(folder).args
        sizes[name] = parameter_count(args)
        assert len(set(args.num_query_heads)) > 1 and len(set(args.ffn_dims)) == args.num_transformer_layers
        assert all(q > kv for q, kv in zip(args.num_query_heads, args.num_kv_heads))
    assert 4e6 <= sizes["target"] <= 8e6 and 1e6 <= sizes["draft"] <= 2e6


def test_generate_and_chat_run_on_both(converted):
    for folder in converted.values():
        p = subprocess.run([SCRIPT, "generate", "-m", str(folder), "-p", "def main():\n", "-n", "12", "--json"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and len(json.loads(p.stdout)["tokens"]) == 12, p.stderr
        p = subprocess.run([SCRIPT, "chat", "-m", str(folder), "-n", "8"], input="import os\n", capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0 and p.stdout.strip(), p.stderr


def test_mlx_lm_loads_the_converted_target(converted):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(converted["target"]))
    assert len(list(mlx_lm.stream_generate(model, tokenizer, "import sys\n", max_tokens=6))) == 6


def test_held_out_perplexity_is_as_recorded(converted, tmp_path):
    if not EVALUATION.is_file():
        pytest.skip("standins/evaluation.json is missing: run python standins/evaluate.py")
    recorded = json.loads(EVALUATION.read_text())["test_piece"]
    _, held = corpus.split(corpus.documents())
    text = corpus.sample(held, recorded["chars"])
    if corpus.digest([corpus.Document("test", text)]) != recorded["sha256"]:
        pytest.skip(f"this Python ({sys.version.split()[0]}) has another standard library: the held-out piece "
                    "differs from the recorded one")
    from mlx_openelm import load
    from mlx_openelm.jobs.perplexity import perplexity

    data = tmp_path / "piece.txt"
    data.write_text(text, encoding="utf-8")
    model, tokenizer = load(converted["target"], dtype="float32")
    result = perplexity(model, tokenizer, data, seq_len=512, stride=256)
    assert result.tokens == recorded["tokens"]
    assert abs(result.ppl / recorded["ppl"] - 1) < 0.02, (result.ppl, recorded["ppl"])
