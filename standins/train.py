"""Train the two stand-in OpenELMs (a target and a draft) on the standard library's own text, and export them as
Apple publishes checkpoints: ``config.json`` + ``model.safetensors`` (HF tensor names, bfloat16) + the
``tokenizer.model`` trained here.

    python standins/train.py                      # tokenizer, target, draft (about 140 minutes on a 2-core CPU)
    python standins/train.py --only draft         # one model, reusing the tokenizer in the output folder
    python standins/train.py --only target --resume   # the recipe's stages not yet in train_record.json

A recipe is a list of stages, each with its own steps, peak learning rate (warm-up, cosine decay) and share of
editing exercises; ``--resume`` starts from the exported model and runs the stages its record does not list yet.

The corpus is built at run time (``standins/corpus.py``); the held-out split is never trained on. Samples are
512-token windows of the training stream (documents framed ``<s> text </s>``), and a stage's share of them (one
in five by default) is an editing exercise instead: a stretch of a training document, the line
``# The same code again, with A renamed to B:``, then that stretch with the identifier renamed. That teaches the
copying the input-grounded speculative benchmark asks of the target (and is said in standins/README.md).

Training is MLX on the CPU in float32. Its cost here is half element-wise work (softmax, SiLU; two data-parallel
ranks under ``mlx.launch`` measured no faster than one process) and half matmuls, which are GEMM-bound: MLX's
bundled reference BLAS makes them about 30x slower than OpenBLAS, so this script re-executes itself with Debian's
OpenBLAS preloaded when it is installed (``apt-get install libopenblas0-pthread``); ``--no-openblas`` skips that.
The runtime and the tests never depend on it.

On a machine with a GPU that MLX uses (Metal on a Mac, ``mlx[cuda]`` on NVIDIA) training runs there, on MLX's
default device; ``--cpu`` keeps it on the CPU. This CPU trains the target at about 400 tokens a second, which is
what bounds the stand-ins' quality (standins/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import openblas  # noqa: E402

if __name__ == "__main__":
    openblas.preload()  # before MLX loads

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(HERE.parent / "tests"))
import corpus  # noqa: E402
from hf_checkpoint import apple_config  # noqa: E402
from spm_util import train_spm  # noqa: E402

from mlx_openelm import Model, ModelArgs  # noqa: E402
from mlx_openelm.config import layer_wise_scaling  # noqa: E402
from mlx_openelm.fileio import atomic_write  # noqa: E402
from mlx_openelm.tokenizer import Tokenizer  # noqa: E402

VOCAB_SIZE = 4096
SEQ_LEN = 512
EDIT_LINE = "\n# The same code again, with {old} renamed to {new}:\n"
EDIT_SHARE = 0.2
_IDENT = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{2,}\b")


@dataclass(frozen=True)
class Stage:
    """A run of steps with one schedule: linear warm-up to ``lr``, cosine decay to ``lr / 10``."""

    steps: int
    lr: float
    edit_share: float = EDIT_SHARE


@dataclass(frozen=True)
class Recipe:
    """A model's shape and its training schedule."""

    name: str
    layers: int
    model_dim: int
    head_dim: int
    stages: tuple[Stage, ...]
    batch: int
    seed: int

    def args(self) -> ModelArgs:
        """OpenELM's layer-wise scaling at this size (GQA groups of 4, multipliers as Apple's)."""
        return ModelArgs.from_dict({
            "num_transformer_layers": self.layers, "model_dim": self.model_dim, "head_dim": self.head_dim,
            **layer_wise_scaling(self.layers, self.model_dim, self.head_dim),
            "ffn_dim_divisor": 64, "vocab_size": VOCAB_SIZE, "max_context_length": SEQ_LEN,
        })


RECIPES = {
    "target": Recipe("openelm-stdlib-target", layers=8, model_dim=256, head_dim=32, batch=4, seed=0,
                     stages=(Stage(640, 3e-3), Stage(400, 1e-3, edit_share=0.1))),
    "draft": Recipe("openelm-stdlib-draft", layers=4, model_dim=128, head_dim=16, batch=16, seed=1,
                    stages=(Stage(240, 4e-3),)),
}


def train_tokenizer(train_docs: list[corpus.Document], out: Path) -> Path:
    """A 4096-piece BPE SentencePiece model with Llama-2's conventions (byte fallback, split digits,
    unk/bos/eos 0/1/2), trained on the training split's lines."""
    text = "\n".join(line for d in train_docs for line in d.text.splitlines() if line.strip())
    return train_spm(out, vocab_size=VOCAB_SIZE, text=text)


def token_stream(tok: Tokenizer, docs: list[corpus.Document]) -> np.ndarray:
    """Every document as ``<s> ids </s>``, concatenated."""
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d.text) + [tok.eos_id]
    return np.array(ids, dtype=np.int32)


def edit_sample(tok: Tokenizer, docs: list[corpus.Document], rng: np.random.Generator) -> list[int] | None:
    """An editing exercise from a random document: a stretch of lines, the instruction, the stretch renamed."""
    d = docs[rng.integers(len(docs))]
    lines = d.text.splitlines(keepends=True)
    start = int(rng.integers(len(lines)))
    chunk = "".join(lines[start : start + int(rng.integers(6, 20))])
    names = [n for n in set(_IDENT.findall(chunk)) if chunk.count(n) >= 2]
    if not names or len(chunk) < 200:
        return None
    old = sorted(names)[rng.integers(len(names))]
    new = f"{old}_{rng.integers(2, 10)}" if rng.random() < 0.5 else f"new_{old}"
    renamed = re.sub(rf"\b{re.escape(old)}\b", new, chunk)
    ids = tok.encode(chunk + EDIT_LINE.format(old=old, new=new) + renamed) + [tok.eos_id]
    return ids if len(ids) <= SEQ_LEN + 1 else None


def batches(stream: np.ndarray, tok: Tokenizer, docs: list[corpus.Document], batch: int, seed: int,
            edit_share: float):
    """Endless ``(inputs, targets, mask)`` batches of ``SEQ_LEN`` tokens, ``edit_share`` of the rows exercises."""
    rng = np.random.default_rng(seed)
    while True:
        rows = np.zeros((batch, SEQ_LEN + 1), np.int32)
        mask = np.ones((batch, SEQ_LEN), np.float32)
        for r in range(batch):
            sample = edit_sample(tok, docs, rng) if rng.random() < edit_share else None
            if sample is None:
                start = int(rng.integers(len(stream) - SEQ_LEN - 1))
                rows[r] = stream[start : start + SEQ_LEN + 1]
            else:
                rows[r, : len(sample)] = sample
                mask[r, len(sample) - 1 :] = 0.0
        yield mx.array(rows[:, :-1]), mx.array(rows[:, 1:]), mx.array(mask)


def held_out_loss(model: Model, stream: np.ndarray, windows: int = 8) -> float:
    """Mean next-token loss over the first ``windows`` non-overlapping windows of the held-out stream."""
    total, count = 0.0, 0
    for w in range(min(windows, (len(stream) - 1) // SEQ_LEN)):
        x = stream[w * SEQ_LEN : (w + 1) * SEQ_LEN + 1]
        logits = model(mx.array(x[None, :-1]))
        loss = nn.losses.cross_entropy(logits, mx.array(x[None, 1:]), reduction="sum")
        total, count = total + loss.item(), count + SEQ_LEN
    return total / count


def export(model: Model, args: ModelArgs, tokenizer_model: Path, out: Path) -> None:
    """Write ``out`` as Apple's HF layout: config.json, model.safetensors (bfloat16), tokenizer.model."""
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in args.to_dict().items() if k != "rms_norm_eps"}
    config = apple_config({**config, "torch_dtype": "bfloat16"})
    weights = {k: v.astype(mx.bfloat16) for k, v in nn.utils.tree_flatten(model.parameters())}
    tmp = out / ".model.safetensors.tmp.safetensors"
    mx.save_safetensors(str(tmp), weights, metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    atomic_write(out / "config.json", json.dumps(config, indent=2) + "\n")
    atomic_write(out / "tokenizer.model", tokenizer_model.read_bytes())


def train(recipe: Recipe, model: Model, first_stage: int, tok: Tokenizer, stream: np.ndarray, held: np.ndarray,
          docs: list[corpus.Document], log) -> list[dict]:
    """Run the recipe's stages from ``first_stage`` on ``model`` with AdamW (gradient clipping; each stage its own
    warm-up and cosine decay and a fresh optimizer); returns one record per stage run."""

    def loss_fn(m: Model, x: mx.array, y: mx.array, mask: mx.array) -> mx.array:
        return (nn.losses.cross_entropy(m(x), y) * mask).sum() / mask.sum()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    records = []
    for index in range(first_stage, len(recipe.stages)):
        stage = recipe.stages[index]
        warmup = max(1, stage.steps // 20)
        schedule = optim.join_schedules(
            [optim.linear_schedule(stage.lr / 20, stage.lr, warmup),
             optim.cosine_decay(stage.lr, stage.steps - warmup, stage.lr / 10)], [warmup])
        optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.05)
        state = [model.state, optimizer.state]
        # The data seed moves with the stage, so a later stage does not replay an earlier one's samples.
        data = batches(stream, tok, docs, recipe.batch, recipe.seed + 1000 * index, stage.edit_share)
        start, losses = time.perf_counter(), []
        log(f"{recipe.name} stage {index + 1}/{len(recipe.stages)}: {stage.steps} steps of {recipe.batch}x{SEQ_LEN} "
            f"tokens, peak lr {stage.lr}, editing exercises {stage.edit_share:.0%}")
        for n in range(1, stage.steps + 1):
            # Not compiled: at 2048-8192 tokens a step, tracing saves nothing measurable.
            loss, grads = loss_and_grad(model, *next(data))
            grads, _ = optim.clip_grad_norm(grads, 1.0)
            optimizer.update(model, grads)
            mx.eval(state, loss)
            losses.append(loss.item())
            if n % 50 == 0 or n == stage.steps:
                elapsed = time.perf_counter() - start
                log(f"  step {n}/{stage.steps}  loss {np.mean(losses[-50:]):.3f}  {elapsed / n:.2f} s/step  "
                    f"eta {elapsed / n * (stage.steps - n) / 60:.1f} min")
        seconds = time.perf_counter() - start
        held_loss = held_out_loss(model, held)
        log(f"  held-out loss {held_loss:.3f} (perplexity {math.exp(held_loss):.2f}) after {seconds / 60:.1f} min")
        records.append({
            "steps": stage.steps, "lr": stage.lr, "edit_share": stage.edit_share,
            "tokens_seen": stage.steps * recipe.batch * SEQ_LEN, "seconds": round(seconds, 1),
            "final_train_loss": float(np.mean(losses[-50:])), "held_out_loss_first_8_windows": held_loss,
            "device": str(mx.default_device()), "blas": "openblas" if openblas.active() else "mlx reference",
        })
    return records


def exported(folder: Path) -> Model:
    """The model ``export`` wrote to ``folder``, in float32, to train further."""
    args = ModelArgs.from_dict(json.loads((folder / "config.json").read_text()))
    model = Model(args)
    model.load_weights([(k, v.astype(mx.float32)) for k, v in mx.load(str(folder / "model.safetensors")).items()])
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE, help="folder for the model folders and train_record.json")
    p.add_argument("--only", choices=sorted(RECIPES), action="append", help="train only this model (repeatable)")
    p.add_argument("--steps", type=int, help="override every stage's step count (for a quick try)")
    p.add_argument("--resume", action="store_true",
                   help="start from the exported model and run only the stages train_record.json does not list")
    p.add_argument("--no-openblas", action="store_true", help="do not re-execute with OpenBLAS preloaded")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when MLX has a GPU")
    args = p.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.cpu:
        mx.set_default_device(mx.cpu)
    docs = corpus.documents()
    info = corpus.describe(docs)
    train_docs, held_docs = corpus.split(docs)
    log(f"corpus: {info['documents']} documents, sha256 {info['sha256'][:16]}..., "
        f"{info['held_out']['documents']} held out; device {mx.default_device()}; "
        f"BLAS preload: {os.environ.get('LD_PRELOAD') or 'none'}")
    record_path = args.out / "train_record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    recorded = record.get("corpus", {}).get("sha256")
    if recorded and recorded != info["sha256"]:
        log(f"note: this Python's standard library gives corpus {info['sha256'][:12]}..., not the recorded "
            f"{recorded[:12]}...: the models and figures made now are this corpus's own")
    tokenizer_model = args.out / "tokenizer.model"
    existing = args.out / RECIPES["target"].name / "tokenizer.model"
    if args.only and existing.is_file():
        tokenizer_model = existing
    else:
        tic = time.perf_counter()
        tokenizer_model = train_tokenizer(train_docs, args.out / ".tokenizer")
        record["tokenizer"] = {"vocab_size": VOCAB_SIZE, "seconds": round(time.perf_counter() - tic, 1)}
    tok = Tokenizer.from_file(tokenizer_model)
    stream, held = token_stream(tok, train_docs), token_stream(tok, held_docs)
    log(f"tokens: {len(stream)} train, {len(held)} held out")
    record.update(corpus={k: v for k, v in info.items() if k != "python_stdlib"},
                  python=sys.version.split()[0], train_tokens=int(len(stream)), held_out_tokens=int(len(held)))
    for key in args.only or list(RECIPES):
        recipe = RECIPES[key]
        if args.steps:
            recipe = replace(recipe, stages=tuple(replace(stage, steps=args.steps) for stage in recipe.stages))
        folder = args.out / recipe.name
        done = record.get(key, {}).get("stages", []) if args.resume else []
        if [d["steps"] for d in done] != [stage.steps for stage in recipe.stages[: len(done)]]:
            log(f"error: {record_path} lists stages of {[d['steps'] for d in done]} steps for {key}, which are not "
                f"the recipe's first ones; retrain it without --resume")
            return 2
        if len(done) == len(recipe.stages):
            log(f"{recipe.name}: all {len(done)} stages are done already")
            continue
        if done:
            model = exported(folder)
        else:
            mx.random.seed(recipe.seed)
            model = Model(recipe.args())
        n_params = sum(v.size for _, v in nn.utils.tree_flatten(model.parameters()))
        log(f"{recipe.name}: {n_params / 1e6:.2f}M parameters" + (f", resumed after stage {len(done)}" if done else ""))
        stages = done + train(recipe, model, len(done), tok, stream, held, train_docs, log)
        export(model, recipe.args(), tokenizer_model, folder)
        record[key] = {"name": recipe.name, "parameters": n_params, "batch": recipe.batch, "seq_len": SEQ_LEN,
                       "seed": recipe.seed, **{k: sum(st[k] for st in stages) for k in ("steps", "tokens_seen",
                                                                                         "seconds")},
                       "stages": stages}
        atomic_write(record_path, json.dumps(record, indent=2) + "\n")
        log(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
