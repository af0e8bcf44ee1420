"""Measure the stand-ins on the held-out split: perplexity of the target, the draft and a random model of the
target's shape; how often the draft's greedy choice is the target's; a greedy continuation of held-out code; and
the figure the test suite checks (``tests/test_standins.py``). Writes ``standins/evaluation.json``.

    python standins/evaluate.py

Every model goes through ``mlx-openelm convert`` first, as Apple's checkpoints would, and is scored in float32 by
the project's own perplexity job. Like ``train.py`` this re-executes itself with Debian's OpenBLAS preloaded when
it is installed (``--no-openblas`` skips it): float32 matmuls, 20-30x faster, the same figures to ~1e-6. When the
running Python's standard library differs from the recorded one, the script says so and reports its own figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import openblas  # noqa: E402

if __name__ == "__main__":
    openblas.preload()  # before MLX loads

import corpus  # noqa: E402
import mlx.core as mx  # noqa: E402
from mlx_openelm.convert import convert  # noqa: E402

from mlx_openelm import generate, load, random_model, save  # noqa: E402
from mlx_openelm.fileio import atomic_write  # noqa: E402
from mlx_openelm.jobs.perplexity import perplexity  # noqa: E402

TARGET, DRAFT = HERE / "openelm-stdlib-target", HERE / "openelm-stdlib-draft"
SEQ_LEN, STRIDE = 512, 256
TEST_CHARS = 3000  # the test's piece of the held-out split: its first 3000 characters
CONTINUATION_FILE, CONTINUATION_LINES, CONTINUATION_TOKENS = "calendar.py", 24, 96


def agreement(target, draft, tokenizer, docs: list[corpus.Document], tokens: int) -> dict:
    """Teacher-forced: the share of held-out positions where the draft's argmax is the target's."""
    same = total = 0
    for d in docs:
        ids = tokenizer.encode(d.text)
        for start in range(0, len(ids) - 1, SEQ_LEN):
            x = mx.array([ids[start : start + SEQ_LEN]])
            a, b = mx.argmax(target(x), -1), mx.argmax(draft(x), -1)
            same += int((a == b).sum().item())
            total += x.shape[1]
            if total >= tokens:
                return {"positions": total, "agreement": same / total}
    return {"positions": total, "agreement": same / total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-openblas", action="store_true")
    p.add_argument("--agreement-tokens", type=int, default=16384, help="held-out positions for the draft agreement")
    args = p.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    docs = corpus.documents()
    info = corpus.describe(docs)
    _, held = corpus.split(docs)
    record_path = HERE / "train_record.json"
    recorded = json.loads(record_path.read_text())["corpus"] if record_path.is_file() else {}
    if recorded and recorded["sha256"] != info["sha256"]:
        log(f"note: this Python's standard library gives corpus {info['sha256'][:12]}..., not the recorded "
            f"{recorded['sha256'][:12]}...: the figures below are this corpus's own")
    out: dict = {"corpus": {k: v for k, v in info.items() if k != "python_stdlib"}, "seq_len": SEQ_LEN,
                 "stride": STRIDE, "python": sys.version.split()[0],
                 "blas": "openblas" if openblas.active() else "mlx reference"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = corpus.write_documents(held, tmp / "held-out")
        test_data = tmp / "test.txt"
        test_data.write_text(corpus.sample(held, TEST_CHARS), encoding="utf-8")
        folders = {name: convert(src, tmp / name, tokenizer_rebuild=False).path
                   for name, src in (("target", TARGET), ("draft", DRAFT))}
        models = {name: load(f, dtype="float32") for name, f in folders.items()}
        tokenizer = models["target"][1]
        shaped = random_model(models["target"][0].args, dtype="float32", seed=0)
        folders["random"] = save(shaped, tmp / "random")
        (folders["random"] / "tokenizer.model").write_bytes((folders["target"] / "tokenizer.model").read_bytes())
        models["random"] = load(folders["random"], dtype="float32")
        for name, (model, tok) in models.items():
            tic = time.perf_counter()
            r = perplexity(model, tok, data, seq_len=SEQ_LEN, stride=STRIDE, batch_size=4)
            out[f"{name}_held_out"] = {"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens}
            log(f"{name}: held-out perplexity {r.ppl:.3f} over {r.tokens} tokens ({time.perf_counter() - tic:.0f} s)")
        t = perplexity(models["target"][0], tokenizer, test_data, seq_len=SEQ_LEN, stride=STRIDE, batch_size=4)
        out["test_piece"] = {"chars": TEST_CHARS, "sha256": corpus.digest([corpus.Document("test", test_data.read_text(
            encoding="utf-8"))]), "ppl": t.ppl, "tokens": t.tokens, "dtype": "float32"}
        log(f"test piece: perplexity {t.ppl:.4f} over {t.tokens} tokens")
        out["draft_agreement"] = agreement(models["target"][0], models["draft"][0], tokenizer, held,
                                           args.agreement_tokens)
        log(f"draft top-1 = target top-1 on {100 * out['draft_agreement']['agreement']:.1f}% of "
            f"{out['draft_agreement']['positions']} held-out positions")
        source = next(d for d in held if d.name == CONTINUATION_FILE)
        prompt = "".join(source.text.splitlines(keepends=True)[:CONTINUATION_LINES])
        text = generate(models["target"][0], tokenizer, prompt, max_tokens=CONTINUATION_TOKENS)
        out["continuation"] = {"file": CONTINUATION_FILE, "prompt_lines": CONTINUATION_LINES, "prompt": prompt,
                               "greedy": text}
        log(f"greedy continuation of {CONTINUATION_FILE}:\n{prompt}>>>{text}")
    atomic_write(HERE / "evaluation.json", json.dumps(out, indent=2) + "\n")
    log(f"wrote {HERE / 'evaluation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
