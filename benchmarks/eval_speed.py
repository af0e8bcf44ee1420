"""Evaluation speed: log-likelihood requests per second through ``mlx-openelm eval``'s model class against
``mlx_lm.evaluate``'s (``MLXLM``), on the same converted folder and the same multiple-choice requests, in one
process, alternating which side goes first.

The task is written here from held-out standard-library code (the stand-ins' own corpus): each question is a few
lines of a file, its choices the true next line and three lines from elsewhere, each request the question and
``" " + choice`` (as lm-eval's multiple choice asks). Both sides also report their accuracy on it and the largest
difference between their log-likelihoods: the questions end in a newline, which lm-eval's own models (and ours)
move into the continuation before tokenizing while mlx-lm's class does not, so the two score slightly different
token sequences.

    python benchmarks/eval_speed.py [--questions 64] [--rounds 3] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from mlx_lm.evaluate import MLXLM
from mlx_openelm.convert import convert

from mlx_openelm import load
from mlx_openelm.bench import write_json
from mlx_openelm.device import device_info
from mlx_openelm.evaluate import model_class

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FILES = ("json/encoder.py", "csv.py", "textwrap.py", "shlex.py", "fractions.py", "glob.py")


def questions(n: int, seed: int = 0) -> list[tuple[str, list[str], int]]:
    """``(question, choices, label)``: a few lines of a stdlib file, then its true next line among three others."""
    rng = random.Random(seed)
    lines = [line for f in FILES for line in (Path(sysconfig.get_paths()["stdlib"]) / f).read_text().splitlines()]
    out = []
    while len(out) < n:
        i = rng.randrange(4, len(lines) - 1)
        if len(lines[i + 1].strip()) < 8:
            continue
        choices = [lines[i + 1].strip()] + [lines[rng.randrange(len(lines))].strip() or "pass" for _ in range(3)]
        rng.shuffle(choices)
        out.append(("\n".join(lines[i - 4 : i + 1]) + "\n", choices, choices.index(lines[i + 1].strip())))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    qs = questions(args.questions)
    requests = [SimpleNamespace(args=(q, " " + c)) for q, choices, _ in qs for c in choices]
    with tempfile.TemporaryDirectory() as tmp:
        folder = convert(REPO / "standins" / "openelm-stdlib-target", Path(tmp) / "target", dtype="float32").path
        model, tokenizer = load(folder)
        sides = {"mlx-openelm": model_class()(model, tokenizer, batch_size=args.batch_size),
                 "mlx-lm": MLXLM(str(folder), batch_size=args.batch_size)}
        times: dict[str, list[float]] = {name: [] for name in sides}
        scores = {}
        for r in range(args.rounds + 1):  # the first round warms up both
            for name in (list(sides) if r % 2 else list(sides)[::-1]):
                tic = time.perf_counter()
                scores[name] = [ll for ll, _ in sides[name].loglikelihood(requests)]
                if r:
                    times[name].append(time.perf_counter() - tic)
    accuracy = {}
    for name, lls in scores.items():
        right, k = 0, 0
        for _, choices, label in qs:
            mine = lls[k : k + len(choices)]
            right += max(range(len(mine)), key=mine.__getitem__) == label
            k += len(choices)
        accuracy[name] = right / len(qs)
    rps = {name: len(requests) / statistics.median(t) for name, t in times.items()}
    record = {"requests": len(requests), "questions": len(qs), "batch_size": args.batch_size, "rounds": args.rounds,
              "model": "stand-in target (float32)", "seconds": times, "requests_per_second": rps,
              "ratio": rps["mlx-openelm"] / rps["mlx-lm"], "accuracy": accuracy,
              "max_abs_loglikelihood_difference": max(abs(a - b) for a, b in zip(*scores.values())),
              "device": device_info()}
    print(f"{len(requests)} requests ({len(qs)} questions x 4 choices), batch size {args.batch_size}, median of "
          f"{args.rounds} alternating rounds: mlx-openelm {rps['mlx-openelm']:.1f} req/s, mlx-lm "
          f"{rps['mlx-lm']:.1f} req/s, ratio {record['ratio']:.2f}; accuracy {accuracy['mlx-openelm']:.3f} / "
          f"{accuracy['mlx-lm']:.3f}; max |log-likelihood difference| {record['max_abs_loglikelihood_difference']:.2e}")
    print(f"wrote {write_json(RESULTS / 'eval_speed.json', record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
