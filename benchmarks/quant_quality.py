"""Conversion quality, every model going through ``convert`` and ``load``.

1. Quantization (default) on the trained stand-in target (``standins/``), over held-out standard-library text it
   never saw: perplexity, mean KL divergence of the next-token distributions and top-1 agreement against the
   bfloat16 weights, and bits per weight, for 8-bit, 4-bit (groups 32/64/128), 3-bit and the mixed recipes. All
   compute with float32 activations (scales are stored in bfloat16 and cast up exactly), so the figures measure
   the weights' error alone.
2. ``--numerics``: bfloat16 numerics on a random OpenELM-270M: mean absolute logit error of our bfloat16 model
   against float32, beside the NumPy reference that emulates Apple's code (weights and matmul outputs rounded to
   bfloat16, RMSNorm and RoPE in float32) against its own float32 pass. Acceptance (issue #3): ours is not worse.

    python benchmarks/quant_quality.py [--tokens 16384]
    python benchmarks/quant_quality.py --numerics [--preset OpenELM-270M] [--prompts 4] [--length 32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "standins")]  # the HF writer, the NumPy reference, the corpus

from hf_checkpoint import write_hf_checkpoint  # noqa: E402
from mlx_openelm.convert import convert  # noqa: E402
from numpy_reference import forward, round_bf16  # noqa: E402

from mlx_openelm import __version__, load_model, random_model  # noqa: E402
from mlx_openelm.bench import write_json  # noqa: E402
from mlx_openelm.device import device_info  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SETTINGS = {  # name: convert() keyword arguments
    "8-bit": {"q_bits": 8},
    "4-bit g32": {"q_bits": 4, "q_group_size": 32},
    "4-bit": {"q_bits": 4},
    "4-bit g128": {"q_bits": 4, "q_group_size": 128},
    "3-bit": {"q_bits": 3},
    "mixed_4_6": {"q_recipe": "mixed_4_6"},
    "mixed_4_8": {"q_recipe": "mixed_4_8"},
    "mixed_3_6": {"q_recipe": "mixed_3_6"},
}
STANDIN = REPO / "standins" / "openelm-stdlib-target"
WINDOW = 512


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64."""
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(reference: np.ndarray, other: np.ndarray) -> dict:
    """Mean KL(reference || other) per position, top-1 agreement and mean |logit error|."""
    p, q = log_softmax(reference), log_softmax(other)
    kl = (np.exp(p) * (p - q)).sum(-1)
    return {
        "mean_kl": float(kl.mean()),
        "top1_agreement": float((reference.argmax(-1) == other.argmax(-1)).mean()),
        "mean_abs_logit_error": float(np.abs(reference - other).mean()),
    }


def logits(folder: Path, tokens: np.ndarray, dtype: str | None = None) -> np.ndarray:
    """float32 logits of a converted folder (``dtype`` casts its float parameters first)."""
    model = load_model(folder, dtype=dtype)
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def log_probs(model, ids: list[int], window: tuple[int, int, int]) -> np.ndarray:
    """Float32 next-token log-probabilities at the positions a ``(start, end, first)`` window scores."""
    start, end, first = window
    logits = model(mx.array([ids[start : end - 1]])).astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0, first - start - 1 :]


def standin_quantization(tokens: int) -> dict:
    """The quantization table on the stand-in target over the first ``tokens`` held-out tokens."""
    import corpus

    from mlx_openelm.jobs.perplexity import windows
    from mlx_openelm.tokenizer_fetch import load_tokenizer

    docs = corpus.documents()
    _, held = corpus.split(docs)
    work = Path(tempfile.mkdtemp(prefix="quant-quality-"))
    try:
        base = convert(STANDIN, work / "bfloat16", tokenizer_rebuild=False)
        tok = load_tokenizer(base.path)
        ids = [i for d in held for i in tok.encode(d.text)][:tokens]
        wins = windows(len(ids), WINDOW, WINDOW - 1)
        reference = load_model(base.path, dtype="float32")
        refs = [log_probs(reference, ids, w) for w in wins]
        table = {}
        for name, kwargs in {"bfloat16": {}, **SETTINGS}.items():
            result = base if not kwargs else convert(STANDIN, work / name, tokenizer_rebuild=False, **kwargs)
            model = load_model(result.path, dtype="float32") if kwargs else None  # bfloat16 is the reference
            nll = kl = agree = 0.0
            for (start, end, first), ref in zip(wins, refs):
                lp = log_probs(model, ids, (start, end, first)) if model is not None else ref
                nll -= float(lp[np.arange(len(lp)), ids[first:end]].astype(np.float64).sum())
                kl += float((np.exp(ref) * (ref - lp)).sum(-1).astype(np.float64).sum())
                agree += float((ref.argmax(-1) == lp.argmax(-1)).sum())
            n = sum(end - first for _, end, first in wins)
            table[name] = {"bits_per_weight": round(result.bits_per_weight, 3), "ppl": float(np.exp(nll / n)),
                           "mean_kl": kl / n, "top1_agreement": agree / n, "tokens": n,
                           "unquantized_layers": len(result.unquantized)}
            print(name, json.dumps(table[name]), flush=True)
            if kwargs:
                shutil.rmtree(result.path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"model": "standins/openelm-stdlib-target", "held_out_tokens": tokens, "window": WINDOW,
            "corpus_sha256": corpus.digest(docs), "quantization_vs_bfloat16": table}


def numerics(opts: argparse.Namespace) -> dict:
    """bfloat16 numerics and (on random weights) the quantization figures of the first build."""
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="quant-quality-"))
    try:
        model = random_model(opts.preset, dtype="float32", seed=opts.seed)
        config = model.args.to_dict()
        weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
        src = write_hf_checkpoint(weights, config, work / "src")
        del model
        rng = np.random.default_rng(opts.seed)
        tokens = rng.integers(3, config["vocab_size"], (opts.prompts, opts.length))

        def run(name: str, **kwargs) -> tuple[Path, dict]:
            result = convert(src, work / name, tokenizer_rebuild=False, **kwargs)
            return result.path, {"bits_per_weight": round(result.bits_per_weight, 3), "gb": result.nbytes / 1e9}

        f32, _ = run("float32", dtype="float32")
        bf16, bf16_size = run("bfloat16")
        ours32, ours16 = logits(f32, tokens), logits(bf16, tokens)
        ref32 = forward(weights, config, tokens)
        ref16 = forward(weights, config, tokens, round_to=round_bf16)
        ours, ref = compare(ours32, ours16), compare(ref32, ref16)
        numerics = {
            "ours_bf16_vs_fp32": ours,
            "reference_bf16_vs_fp32": ref,
            "error_ratio_ours_over_reference": ours["mean_abs_logit_error"] / ref["mean_abs_logit_error"],
            "fp32_max_abs_diff_ours_vs_reference": float(np.abs(ours32 - ref32).max()),
            "pass": ours["mean_abs_logit_error"] <= ref["mean_abs_logit_error"],
        }
        print(json.dumps(numerics, indent=2), flush=True)

        baseline = logits(bf16, tokens, dtype="float32")  # bfloat16 weights, float32 activations
        quant = {"bfloat16": {**bf16_size, **compare(baseline, baseline)}}
        for name, kwargs in SETTINGS.items():
            path, size = run(name, **kwargs)
            quant[name] = {**size, **compare(baseline, logits(path, tokens, dtype="float32"))}
            shutil.rmtree(path)
            print(name, json.dumps(quant[name]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "quant_quality",
        "preset": opts.preset,
        "prompts": f"{opts.prompts} random token sequences of {opts.length} (seed {opts.seed})",
        "bfloat16_numerics": numerics,
        "quantization_vs_bfloat16": quant,
        "mixed_beats_4bit_on_kl": {r: quant[r]["mean_kl"] < quant["4-bit"]["mean_kl"] for r in SETTINGS if "_" in r},
        "group_size": 64,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numerics", action="store_true", help="bfloat16 numerics on random weights instead")
    parser.add_argument("--tokens", type=int, default=16384, help="held-out tokens for the quantization table")
    parser.add_argument("--preset", default="OpenELM-270M")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    tic = time.perf_counter()
    result = numerics(opts) if opts.numerics else standin_quantization(opts.tokens)
    result |= {"seconds": round(time.perf_counter() - tic, 1), "mlx_openelm_version": __version__,
               "device": device_info()}
    name = f"quant_quality_{opts.preset}.json" if opts.numerics else "quant_quality_standin.json"
    print(f"wrote {write_json(RESULTS / name, result)}")


if __name__ == "__main__":
    main()
