"""``mlx-openelm batch`` against one ``generate`` call per prompt: 64 greedy prompts, batch size 8, same run.

Prompts are the first lines of held-out standard-library files, continued by the trained stand-in target
(``standins/``), 48 tokens each. The two ways alternate (batch, sequential, batch, sequential); both must give
the same texts. Reports each way's wall time and the ratio.

    python benchmarks/batch_speed.py [--prompts 64] [--batch-size 8] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "standins"))
import corpus  # noqa: E402, I001

from mlx_openelm import generate, load  # noqa: E402
from mlx_openelm.bench import write_json  # noqa: E402
from mlx_openelm.convert import convert  # noqa: E402
from mlx_openelm.device import device_info  # noqa: E402
from mlx_openelm.jobs.batch_generate import batch_generate  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    _, held = corpus.split(corpus.documents())
    lines = [line for d in held if d.is_code for line in d.text.splitlines() if len(line.strip()) > 20]
    prompts = [lines[i * 7 % len(lines)] for i in range(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = convert(REPO / "standins" / "openelm-stdlib-target", tmp / "model", tokenizer_rebuild=False).path
        model, tok = load(folder)
        data = tmp / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": q, "max_tokens": args.tokens}) + "\n" for q in prompts))
        times = {"batch": [], "sequential": []}
        texts = {}
        for r in range(args.rounds):
            out = tmp / f"out-{r}.jsonl"
            tic = time.perf_counter()
            batch_generate(model, tok, data, out, batch_size=args.batch_size)
            times["batch"].append(time.perf_counter() - tic)
            texts["batch"] = [json.loads(line)["text"] for line in out.read_text().splitlines()]
            tic = time.perf_counter()
            texts["sequential"] = [generate(model, tok, q, max_tokens=args.tokens) for q in prompts]
            times["sequential"].append(time.perf_counter() - tic)
    median = {k: statistics.median(v) for k, v in times.items()}
    record = {"prompts": args.prompts, "batch_size": args.batch_size, "tokens": args.tokens, "seconds": times,
              "median_seconds": median, "speedup": median["sequential"] / median["batch"],
              "same_texts": texts["batch"] == texts["sequential"], "device": device_info()}
    print(f"batch {median['batch']:.1f} s, sequential {median['sequential']:.1f} s: {record['speedup']:.2f}x; "
          f"same texts: {record['same_texts']}")
    print(f"wrote {write_json(RESULTS / 'batch_speed.json', record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
