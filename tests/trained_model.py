"""A tiny OpenELM that memorizes a fixed text, trained in the test session and exported as Apple's HF checkpoint.

Random weights prove shapes and parity but say nothing; this model says something known, so the whole user path
(HF checkpoint -> convert -> quantize -> load -> generate / chat) can be checked on text. It is trained with MLX
on the CPU in a few seconds, on two framings of one paragraph:

- plain: ``<s> TEXT </s>``, so a base-model prompt (``generate``, or ``chat`` without a template, which passes
  one user message through unchanged) continues the text;
- Instruct: the chat template's rendering of one user message ``PROMPT`` followed by the continuation and
  ``</s>``, so ``chat`` through OpenELM-Instruct's template answers with the continuation.

Training stops once every continuation token beats its runner-up by ``MIN_MARGIN`` logits under teacher forcing,
which implies greedy decoding reproduces the continuation (and the EOS after it) exactly.
The session-scoped fixture ``trained_checkpoint`` reaches every test file through conftest.py: take it by name.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from hf_checkpoint import write_hf_checkpoint
from spm_util import train_spm

from mlx_openelm import Model, ModelArgs
from mlx_openelm.config import layer_wise_scaling
from mlx_openelm.tokenizer import INSTRUCT_CHAT_TEMPLATE, Tokenizer

# The first paragraph of the US Declaration of Independence (1776; public domain).
TEXT = (
    "When in the Course of human events, it becomes necessary for one people to dissolve the political bands "
    "which have connected them with another, and to assume among the powers of the earth, the separate and equal "
    "station to which the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of "
    "mankind requires that they should declare the causes which impel them to the separation."
)
PROMPT = "When in the Course of human events,"
CONTINUATION = TEXT[len(PROMPT) :].strip()

# Apple's layer-wise scaling rule at a tiny size: query heads 4/8/8 with 1/2/2 KV heads (GQA, groups of 4),
# FFN widths 64/192/256. Every matrix's input width is a multiple of 64, the default quantization group size.
LAYERS, MODEL_DIM, HEAD_DIM, GQA_GROUPS, FFN_DIVISOR = 3, 64, 16, 4, 64
QKV_MULTIPLIERS, FFN_MULTIPLIERS = (0.5, 2.0), (0.5, 4.0)
VOCAB_SIZE = 512
SEED = 0
LEARNING_RATE, WARMUP_STEPS, MAX_STEPS, CHECK_EVERY = 1e-2, 20, 600, 10
# Logits between each continuation token and its runner-up when training stops: several times what bfloat16 and
# 8-bit conversion move a logit by (about 1; test_end_to_end.py checks it stays under half the margin).
MIN_MARGIN = 6.0
NAME = "OpenELM-memorized"  # the Instruct copy is NAME + "-Instruct": the converter picks the template by name


@dataclass(frozen=True)
class TrainedCheckpoint:
    """The exported checkpoints and what the model memorized.

    ``path`` / ``instruct_path``: HF-format checkpoint folders (same weights; the converter gives the second one
    the Instruct chat template). ``prompt_ids`` (BOS + prompt) continue greedily with ``continuation_ids``,
    which end with EOS. ``chat_prompt_ids`` is the Instruct template's rendering of one user message ``prompt``.
    """

    path: Path
    instruct_path: Path
    text: str
    prompt: str
    continuation: str
    prompt_ids: list[int]
    chat_prompt_ids: list[int]
    continuation_ids: list[int]
    min_margin: float
    steps: int
    seconds: float  # tokenizer training + model training + export

    def sequences(self) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, continuation ids) for the plain and the Instruct framing."""
        return [(self.prompt_ids, self.continuation_ids), (self.chat_prompt_ids, self.continuation_ids)]


def model_args(vocab_size: int) -> ModelArgs:
    """The tiny config: three layers with uneven heads and FFN widths, GQA, tied embeddings, qk-norm."""
    return ModelArgs.from_dict({
        "num_transformer_layers": LAYERS,
        "model_dim": MODEL_DIM,
        "head_dim": HEAD_DIM,
        **layer_wise_scaling(LAYERS, MODEL_DIM, HEAD_DIM, GQA_GROUPS, QKV_MULTIPLIERS, FFN_MULTIPLIERS),
        "ffn_dim_divisor": FFN_DIVISOR,
        "vocab_size": vocab_size,
        "max_context_length": 512,
    })


def hf_config(args: ModelArgs) -> dict:
    """The model's ``config.json`` fields as Apple writes them.

    No eps (Apple's code fixes it at 1e-6); the GQA group size and QKV multipliers the head lists derive from.
    """
    config = {k: v for k, v in args.to_dict().items() if k != "rms_norm_eps"}
    return {**config, "num_gqa_groups": GQA_GROUPS, "qkv_multipliers": list(QKV_MULTIPLIERS)}


def margins(model: Model, prompt_ids: list[int], continuation_ids: list[int]) -> np.ndarray:
    """Teacher-forced margin of each continuation token: its logit minus the best other logit.

    All positive means greedy decoding from ``prompt_ids`` yields exactly ``continuation_ids``.
    """
    ids = prompt_ids + continuation_ids
    logits = model(mx.array(ids[:-1])[None])[0, len(prompt_ids) - 1 :].astype(mx.float32)
    target = mx.array(continuation_ids)
    correct = mx.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
    others = mx.where(mx.arange(logits.shape[-1]) == target[:, None], -mx.inf, logits).max(axis=-1)
    return np.array(correct - others)


def greedy(model: Model, prompt_ids: list[int], eos_id: int, max_tokens: int) -> list[int]:
    """Greedy decoding by repeated full forward passes (no cache): the generated ids, EOS included if reached."""
    ids = list(prompt_ids)
    for _ in range(max_tokens):
        ids.append(int(model(mx.array(ids)[None])[0, -1].argmax().item()))
        if ids[-1] == eos_id:
            break
    return ids[len(prompt_ids) :]


def load_checkpoint(path: Path) -> Model:
    """Read an HF-format checkpoint folder written here (float32, strict tensor names) into a ``Model``."""
    model = Model(ModelArgs.from_dict(json.loads((path / "config.json").read_text())))
    model.load_weights(str(path / "model.safetensors"), strict=True)
    mx.eval(model.parameters())
    return model


def _batch(sequences: list[list[int]]) -> tuple[mx.array, mx.array, mx.array]:
    # Right-padded inputs/targets and a loss mask; causal attention keeps padding from reaching real positions.
    width = max(len(s) for s in sequences) - 1
    inputs = np.zeros((len(sequences), width), np.int32)
    targets = np.zeros_like(inputs)
    mask = np.zeros(inputs.shape, np.float32)
    for row, s in enumerate(sequences):
        n = len(s) - 1
        inputs[row, :n], targets[row, :n], mask[row, :n] = s[:-1], s[1:], 1.0
    return mx.array(inputs), mx.array(targets), mx.array(mask)


def train(args: ModelArgs, pairs: list[tuple[list[int], list[int]]]) -> tuple[Model, int, float]:
    """Train until every continuation clears ``MIN_MARGIN``; returns the model, the steps and the least margin."""
    mx.random.seed(SEED)
    model = Model(args)
    inputs, targets, mask = _batch([p + c for p, c in pairs])

    def loss_fn(m: Model) -> mx.array:
        return (nn.losses.cross_entropy(m(inputs), targets) * mask).sum() / mask.sum()

    schedule = optim.join_schedules(
        [optim.linear_schedule(LEARNING_RATE / 10, LEARNING_RATE, WARMUP_STEPS),
         optim.cosine_decay(LEARNING_RATE, MAX_STEPS, LEARNING_RATE / 20)],
        [WARMUP_STEPS],
    )
    optimizer = optim.Adam(learning_rate=schedule)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def step() -> mx.array:
        loss, grads = loss_and_grad(model)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    least = -np.inf
    for n in range(1, MAX_STEPS + 1):
        step()
        mx.eval(state)
        if n % CHECK_EVERY == 0:
            least = min(float(margins(model, p, c).min()) for p, c in pairs)
            if least >= MIN_MARGIN:
                return model, n, least
    raise RuntimeError(f"training did not reach a margin of {MIN_MARGIN} in {MAX_STEPS} steps (least {least:.2f})")


def build_trained_checkpoint(root: Path) -> TrainedCheckpoint:
    """Train the tokenizer and the model, then write ``root/NAME`` and ``root/NAME-Instruct`` (HF format)."""
    start = time.perf_counter()
    tokenizer_model = train_spm(root / "spm", vocab_size=VOCAB_SIZE, text=TEXT)
    tok = Tokenizer.from_file(tokenizer_model, INSTRUCT_CHAT_TEMPLATE)
    prompt_ids = tok.encode(PROMPT)
    continuation_ids = tok.encode(CONTINUATION, bos=False) + [tok.eos_id]
    if tok.encode(TEXT) + [tok.eos_id] != prompt_ids + continuation_ids:
        raise RuntimeError("the prompt's tokens are not a prefix of the text's: cut PROMPT at a word boundary")
    chat_prompt_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    args = model_args(tok.vocab_size)
    model, steps, least = train(args, [(prompt_ids, continuation_ids), (chat_prompt_ids, continuation_ids)])

    path = write_hf_checkpoint(model, hf_config(args), root / NAME)
    shutil.copy(tokenizer_model, path / "tokenizer.model")
    instruct_path = root / f"{NAME}-Instruct"
    shutil.copytree(path, instruct_path)
    return TrainedCheckpoint(
        path=path,
        instruct_path=instruct_path,
        text=TEXT,
        prompt=PROMPT,
        continuation=CONTINUATION,
        prompt_ids=prompt_ids,
        chat_prompt_ids=chat_prompt_ids,
        continuation_ids=continuation_ids,
        min_margin=least,
        steps=steps,
        seconds=time.perf_counter() - start,
    )


@functools.cache
def _built_once(session_temp: Path) -> TrainedCheckpoint:
    return build_trained_checkpoint(session_temp / "trained")


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TrainedCheckpoint:
    """The memorizing model, trained and exported once per test session."""
    # A test module that imports this fixture registers its own copy, which pytest caches separately: keying on
    # the session's temporary root keeps it to one training per session all the same.
    return _built_once(tmp_path_factory.getbasetemp())
