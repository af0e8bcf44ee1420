"""Speculative decoding, measured: plain greedy decoding, a draft model and prompt lookup through this project's
compiled step, against mlx-lm's speculative decoding on the same weights, alternating in one run.

1. The trained stand-ins (``standins/``: a 5.8M target and its 1.1M draft, same tokenizer), on two tasks over
   held-out standard-library code: free continuation (the first lines of a file, then 96 tokens), and an
   input-grounded one (a stretch of a file, then "# The same code again, with A renamed to B:", which the target
   answers by copying the stretch with the change).
2. A random OpenELM-270M (bfloat16) with its own 4-bit copy as the draft, on random prompt ids. Random weights
   repeat one token, so every draft is accepted: this part shows the cost structure at 270M size, not a gain a
   trained model would see.
3. The verify cost, at 270M and on the stand-in target: one compiled pass over K + 1 tokens, and the model's own
   uncompiled forward pass over the same tokens (the prefill path speculative decoding started from), each against
   one compiled single-token step, in the same run; and how much of the step and of the pass is matmuls.

Greedy throughout: every configuration yields the same tokens as plain decoding (checked here too). Each timed
block is one generation; blocks alternate their order round by round; the figures are medians.

    python benchmarks/speculative.py [--rounds 4] [--parts standins,270m,verify]

Results: ``benchmarks/results/speculative-standins.json``, ``speculative-270m.json`` and
``speculative-verify.json``, one a part, each written as soon as its part is done (a part not run leaves its
file as it was).
"""

from __future__ import annotations

import argparse
import functools
import keyword
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_lm.generate import generation_stream as mlx_lm_stream
from mlx_lm.generate import speculative_generate_step as mlx_lm_speculative
from mlx_lm.utils import load_model as mlx_lm_load_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "standins"))
import corpus  # noqa: E402, I001

from mlx_openelm import load, random_model, save  # noqa: E402
from mlx_openelm.bench import time_generation, write_json  # noqa: E402
from mlx_openelm.convert import convert  # noqa: E402
from mlx_openelm.decode import DecodeStep, model_forward  # noqa: E402
from mlx_openelm.device import device_info  # noqa: E402

from batch_step import matmuls_alone  # noqa: E402  (benchmarks/, the script's own folder)

RESULTS = REPO / "benchmarks" / "results"
EDIT = "\n# The same code again, with {old} renamed to {new}:\n"
# The figures for the uncompiled prefill path on a random 270M bfloat16 model (cost of an L-token pass over
# a 1-token step, measured on another VM before the compiled verify pass existed), shown beside this run's own.
UNCOMPILED = {2: 1.34, 4: 1.90, 6: 2.50, 9: 3.26}
PARTS = ("standins", "270m", "verify")


def mlx_lm_spec_step(draft, k, stats):
    """mlx-lm's speculative generator as ``(token, logprobs)``, counting the tokens its draft produced."""

    def step(prompt, model, max_tokens):
        for token, logprobs, from_draft in mlx_lm_speculative(prompt, model, draft, num_draft_tokens=k,
                                                              max_tokens=max_tokens):
            stats["drafted_kept"] += bool(from_draft)
            stats["tokens"] += 1
            yield token, logprobs

    return step


def tasks(tokenizer, files: int) -> dict[str, list[tuple[mx.array, int]]]:
    """(prompt ids, tokens to generate) per task, from held-out code files."""
    _, held = corpus.split(corpus.documents())
    code = [d for d in held if d.is_code and d.text.count("\n") > 60][:files]
    out = {"continuation": [], "input-grounded": []}
    for d in code:
        lines = d.text.splitlines(keepends=True)
        out["continuation"].append((mx.array(tokenizer.encode("".join(lines[:12]))), 96))
        chunk = "".join(lines[20:34])
        names = sorted({w for w in chunk.replace("(", " ").replace(".", " ").split() if w.isidentifier()
                        and not keyword.iskeyword(w) and chunk.count(w) >= 2 and len(w) > 3})
        old = names[0] if names else "self"
        ids = tokenizer.encode(chunk + EDIT.format(old=old, new=f"{old}_2"))
        out["input-grounded"].append((mx.array(ids), len(tokenizer.encode(chunk)) + 8))
    return out


def measure(configs: dict, prompts: list[tuple[mx.array, int]], rounds: int) -> dict:
    """Alternating timed generations of every config over every prompt; medians and acceptance per config."""
    times: dict[str, list[float]] = {name: [] for name in configs}
    tokens: dict[str, list] = {name: [] for name in configs}
    accept: dict[str, list] = {name: [] for name in configs}
    for run in configs.values():  # warm-up: traces, allocations
        run(*prompts[0])
    for r in range(rounds):
        for name in list(configs)[:: 1 if r % 2 == 0 else -1]:
            for prompt, n in prompts:
                trial, acc = configs[name](prompt, n)
                times[name].append(trial.generation_tps)
                tokens[name].append(trial.tokens)
                accept[name].append(acc)
    plain = tokens["plain"]
    return {name: {"generation_tps": statistics.median(times[name]), "trials": len(times[name]),
                   "acceptance_rate": None if accept[name][0] is None else statistics.mean(a[0] for a in accept[name]),
                   "tokens_per_pass": None if accept[name][0] is None else statistics.mean(a[1] for a in accept[name]),
                   "same_tokens_as_plain": tokens[name] == plain} for name in configs}


def configs_for(target, draft, theirs, theirs_draft, k: int, lookup: int, lookup_ks: tuple[int, ...]) -> dict:
    def ours(spec):
        def run(prompt, n):
            t = time_generation(target, prompt, n, speculative=spec)
            return t, (None if not spec else (t.acceptance_rate, t.tokens_per_pass))

        return run

    def mlx_lm(step_of):
        def run(prompt, n):
            stats = {"drafted_kept": 0, "tokens": 0}
            t = time_generation(theirs, prompt, n, step_of(stats), stream=mlx_lm_stream)
            # mlx-lm reports which tokens came from the draft; the pass count follows: each pass adds one of its own
            passes = stats["tokens"] - stats["drafted_kept"]
            return t, (None if step_of is plain_step else (stats["drafted_kept"] / max(1, passes * k),
                                                           stats["tokens"] / max(1, passes)))

        return run

    def plain_step(stats):
        return lambda prompt, model, max_tokens: ((t, lp) for t, lp in mlx_lm_generate_step(prompt, model,
                                                                                               max_tokens=max_tokens))

    return {
        "plain": ours(None),
        f"draft model, K={k}": ours({"draft_model": draft, "num_draft_tokens": k}),
        **{f"prompt lookup n={lookup}, K={lk}": ours({"prompt_lookup": lookup, "num_draft_tokens": lk})
           for lk in lookup_ks},
        "mlx-lm plain": mlx_lm(plain_step),
        f"mlx-lm draft model, K={k}": mlx_lm(lambda stats: mlx_lm_spec_step(theirs_draft, k, stats)),
    }


def verify_cost(model, lengths=(2, 4, 6, 9), context: int = 128, reps: int = 15) -> dict:
    """Per L: a compiled pass over L tokens (at ``context`` cached tokens), the model's own uncompiled forward pass
    over them (every position's logits, as verification needs) and the step's matmuls alone at 1 and L tokens
    (``batch_step.matmuls_alone``), in ms and over one compiled single-token step. All alternate rep by rep, and
    each L's ratios use the steps timed beside it (this VM's speed drifts)."""
    from mlx_openelm import make_cache

    cache = make_cache(model)
    step = DecodeStep(model)
    step.prefill(cache, mx.random.randint(0, model.args.vocab_size, (1, context)))
    one = mx.random.randint(0, model.args.vocab_size, (1, 1)).astype(mx.uint32)
    matmuls_one = matmuls_alone(model, 1)
    out = {}
    for n in lengths:
        tokens = mx.random.randint(0, model.args.vocab_size, (1, n)).astype(mx.uint32)
        runs = {"step": (functools.partial(step, cache, one), 1),
                "compiled": (functools.partial(step.verify, cache, tokens), n),
                "uncompiled": (functools.partial(model_forward, model, cache, tokens), n),
                "matmuls_one_token": (matmuls_one, 0), "matmuls": (matmuls_alone(model, 1, n), 0)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for rep in range(2 + reps):  # two untimed reps: traces, allocations
            for name, (run, length) in runs.items():
                tic = time.perf_counter()
                mx.eval(run())
                if rep >= 2:
                    times[name].append(time.perf_counter() - tic)
                cache.trim(length)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        out[str(n)] = {**{f"{name}_ms": v for name, v in ms.items()},
                       "compiled_over_one_token": ms["compiled"] / ms["step"],
                       "uncompiled_over_one_token": ms["uncompiled"] / ms["step"],
                       "issue_uncompiled_over_one_token": UNCOMPILED.get(n),
                       "matmul_share_of_step": ms["matmuls_one_token"] / ms["step"],
                       "matmul_share_of_pass": ms["matmuls"] / ms["compiled"]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4,
                   help="alternating rounds of the stand-in part (timings this small drift by about 10%%)")
    p.add_argument("--files", type=int, default=3, help="held-out files per task")
    p.add_argument("--parts", default=",".join(PARTS), help=f"which parts to run, comma-separated: {', '.join(PARTS)}")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        p.error(f"--parts takes a comma-separated choice of {', '.join(PARTS)}, got {args.parts!r}")
    device = device_info()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "standins" in parts or "verify" in parts:
            folders = {n: convert(REPO / "standins" / f"openelm-stdlib-{n}", tmp / n, tokenizer_rebuild=False).path
                       for n in ("target", "draft")}
            (target, tok), (draft, _) = load(folders["target"]), load(folders["draft"])
        if "standins" in parts:
            theirs, theirs_draft = mlx_lm_load_model(folders["target"])[0], mlx_lm_load_model(folders["draft"])[0]
            configs = configs_for(target, draft, theirs, theirs_draft, k=3, lookup=3, lookup_ks=(4, 8))
            record: dict = {"device": device, "rounds": args.rounds, "files_per_task": args.files}
            for task, prompts in tasks(tok, args.files).items():
                record[task] = measure(configs, prompts, args.rounds)
                print(task, record[task], flush=True)
            print(f"wrote {write_json(RESULTS / 'speculative-standins.json', record)}")
        if "270m" in parts or "verify" in parts:
            big = random_model("OpenELM-270M", dtype="bfloat16")
        if "270m" in parts:
            q4 = random_model("OpenELM-270M", dtype="bfloat16")  # same seed: the same weights, then 4-bit
            nn.quantize(q4, group_size=64, bits=4)
            mx.eval(q4.parameters())
            their_big = mlx_lm_load_model(save(big, tmp / "270m"))[0]
            their_q4 = mlx_lm_load_model(save(q4, tmp / "270m-q4", config={"quantization": {
                "group_size": 64, "bits": 4, "mode": "affine"}}))[0]
            prompts = [(mx.random.randint(0, 32000, (32,), key=mx.random.key(i)).astype(mx.uint32), 48)
                       for i in range(2)]
            big_configs = configs_for(big, q4, their_big, their_q4, k=3, lookup=3, lookup_ks=(8,))
            record = {"device": device, "rounds": 1, "random": measure(big_configs, prompts, 1)}
            print("270M", record["random"], flush=True)
            print(f"wrote {write_json(RESULTS / 'speculative-270m.json', record)}")
        if "verify" in parts:
            record = {"device": device, "context": 128, "reps": 15}
            for name, model in (("OpenELM-270M random bfloat16", big), ("stand-in target bfloat16", target)):
                record[name] = verify_cost(model)
                print("verify cost", name, record[name], flush=True)
            print(f"wrote {write_json(RESULTS / 'speculative-verify.json', record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
