"""The user's path on a model that says something known: HF checkpoint -> `mlx-openelm convert` -> `generate` / `chat`.

The model of trained_model.py memorized a paragraph. Greedy decoding is exact wherever conversion keeps each
token's logit ahead of its runner-up: that holds for bfloat16 and 8-bit, whose logit error is measured here against
the model's least top-1 margin, and not guaranteed for 4-bit, whose token agreement is reported and bounded below.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from trained_model import load_checkpoint, margins

from mlx_openelm import load_model
from mlx_openelm.tokenizer import INSTRUCT_CHAT_TEMPLATE
from mlx_openelm.tokenizer_fetch import load_tokenizer

CONVERSIONS = {
    "bfloat16": ["--dtype", "bfloat16"],
    "8-bit": ["--dtype", "bfloat16", "-q", "--q-bits", "8"],
    "4-bit": ["--dtype", "bfloat16", "-q", "--q-bits", "4"],
}
# 4-bit affine quantization (group 64) rounds each weight to one of 16 levels per group, a step 17x the 8-bit one;
# on this model its logit error (about 10) exceeds half the least top-1 margin (about 6), so exactness is not
# guaranteed, and a single flipped token makes greedy decoding leave the memorized text for good. Agreement is the
# share of the continuation's tokens produced before the first difference. Measured on seeds 0-2 of the training
# recipe: 4-bit kept 71 of 71 tokens every time; 3-bit (twice 4-bit's step) kept 96-99% of teacher-forced top-1
# choices yet derailed after 16-55 tokens, 2-bit after 0-4. So 90% passes 4-bit's rounding noise with room and
# fails a path that loses precision down to 3-bit level (wrong scales, a dropped or mis-shaped layer).
MIN_4BIT_AGREEMENT = 0.9


def mlx_openelm(*args: str, stdin: str = "") -> str:
    """Run the installed console script (beside this interpreter); its stdout, or fail with its stderr."""
    beside = Path(sys.executable).with_name("mlx-openelm")
    script = str(beside) if beside.is_file() else shutil.which("mlx-openelm")
    assert script, "the mlx-openelm console script is not installed: pip install -e ."
    result = subprocess.run([script, *args], input=stdin, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"mlx-openelm {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def converted(trained_checkpoint, tmp_path_factory):
    """``converted(name, instruct=False)``: the checkpoint converted with ``CONVERSIONS[name]``, once per module."""
    root = tmp_path_factory.mktemp("converted")
    done: dict[tuple[str, bool], Path] = {}

    def get(name: str, instruct: bool = False) -> Path:
        if (name, instruct) not in done:
            source = trained_checkpoint.instruct_path if instruct else trained_checkpoint.path
            out = root / f"{source.name}-{name}"
            mlx_openelm("convert", str(source), "-o", str(out), *CONVERSIONS[name])
            done[name, instruct] = out
        return done[name, instruct]

    return get


def _generate(model_dir: Path, trained, *options: str) -> str:
    # Room for a few tokens past the text: the output must end where the model emits EOS.
    return mlx_openelm("generate", "--model", str(model_dir), "--prompt", trained.prompt, "--temp", "0",
                       "--max-tokens", str(len(trained.continuation_ids) + 8), *options)


@pytest.mark.parametrize("name", ["bfloat16", "8-bit"])
def test_quantization_error_is_below_half_the_least_margin(converted, trained_checkpoint, name):
    # Why bfloat16 and 8-bit reproduce the text exactly: if every logit moves by less than half the gap between
    # the right token and the runner-up, no argmax along the memorized sequence can change.
    reference = load_checkpoint(trained_checkpoint.path)
    model = load_model(converted(name))
    for prompt_ids, continuation_ids in trained_checkpoint.sequences():
        ids = mx.array(prompt_ids + continuation_ids[:-1])[None]
        start = len(prompt_ids) - 1
        error = np.abs(np.array(model(ids)[0, start:].astype(mx.float32)) - np.array(reference(ids)[0, start:]))
        least = margins(reference, prompt_ids, continuation_ids).min()
        assert error.max() < least / 2, f"{name}: logit error {error.max():.2f}, least margin {least:.2f}"


@pytest.mark.parametrize("name", ["bfloat16", "8-bit"])
def test_generate_prints_the_memorized_text(converted, trained_checkpoint, name):
    assert _generate(converted(name), trained_checkpoint).strip() == trained_checkpoint.continuation


def test_4bit_token_agreement(converted, trained_checkpoint, record_property):
    expected = trained_checkpoint.continuation_ids  # EOS included: the text must also end where it should
    out = _generate(converted("4-bit"), trained_checkpoint, "--json")
    produced = json.loads(out)["tokens"]
    same = next((i for i, (a, b) in enumerate(zip(produced, expected)) if a != b), min(len(produced), len(expected)))
    agreement = same / len(expected)
    record_property("4bit_token_agreement", agreement)
    assert agreement >= MIN_4BIT_AGREEMENT, f"4-bit reproduced {same} of {len(expected)} tokens: {out}"


def test_chat_answers_with_the_continuation(converted, trained_checkpoint):
    # A base model has no template: one user message is the prompt as is. Each stdin line is a message;
    # /reset starts over, so the second answer comes from a cache trimmed back to the prompt and must match.
    model_dir = converted("bfloat16")
    assert load_tokenizer(model_dir).chat_template is None
    prompt = trained_checkpoint.prompt
    replies = mlx_openelm("chat", "--model", str(model_dir), stdin=f"{prompt}\n/reset\n{prompt}\n").splitlines()
    assert replies == [trained_checkpoint.continuation] * 2


def test_chat_through_the_instruct_template(converted, trained_checkpoint):
    # The "-Instruct" checkpoint converts with OpenELM-Instruct's template; the model learned that framing too.
    model_dir = converted("8-bit", instruct=True)
    assert load_tokenizer(model_dir).chat_template == INSTRUCT_CHAT_TEMPLATE
    replies = mlx_openelm("chat", "--model", str(model_dir), stdin=f"{trained_checkpoint.prompt}\n").splitlines()
    assert replies == [trained_checkpoint.continuation]
