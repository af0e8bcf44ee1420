"""mlx-openelm beside llama.cpp on the same weights, each converted by its own project's converter.

One Apple-layout checkpoint (``--checkpoint``: a download, a stand-in; default: random weights of ``--preset``
written as one) is converted by llama.cpp's ``convert_hf_to_gguf.py`` (BF16, F16, Q8_0; Q4_0 by llama.cpp's own
quantizer from the BF16 file) and by ours (bfloat16, float16, 8-bit, 4-bit). For each precision pair and prompt
length, one process times both (llama.cpp through llama-cpp-python), greedy on random prompt ids, a warm-up each,
then trials alternating which side goes first: prompt tok/s, generation tok/s, time to first token and the cores
each kept busy (CPU time / wall time). Peak memory is the resident-set growth of a child process that loads the
model and runs one generation (on a Mac with Metal, GPU buffers may be outside it for both sides). On the float
pairs both sides' first greedy tokens must agree; a disagreement is reported (and the exit code is 2), never hidden.
Writes JSON and a Markdown table with the machine and both versions. Never downloads weights.

Needs llama-cpp-python (a build of llama.cpp; Metal by default on a Mac) and a llama.cpp source tree for its
converter, with torch and transformers: docs/benchmarks.md#llamacpp-on-the-same-weights says how.

    python benchmarks/compare_llama_cpp.py --llama-cpp build/llama/llama_cpp_python-0.3.36/vendor/llama.cpp
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_openelm.convert import convert

from mlx_openelm import __version__, load_model, preset, random_model, save
from mlx_openelm.bench import check_counts, check_output, device_label, time_generation, write_atomic, write_json
from mlx_openelm.cache import cache_dtype
from mlx_openelm.decode import describe
from mlx_openelm.device import device_info

RESULTS = Path(__file__).parent / "results"
# Precision pairs: llama.cpp's GGUF type and our conversion of the same checkpoint.
PAIRS: dict[str, tuple[str, dict[str, Any]]] = {
    "bf16": ("BF16", {"dtype": "bfloat16"}),
    "f16": ("F16", {"dtype": "float16"}),
    "q8": ("Q8_0", {"dtype": "bfloat16", "q_bits": 8}),
    "q4": ("Q4_0", {"dtype": "bfloat16", "q_bits": 4}),
}
FLOAT_PAIRS = ("bf16", "f16")
SIDES = ("mlx-openelm", "llama.cpp")
KEYS = ("prompt_tps", "generation_tps", "ttft_s", "cores")
LLAMA_CPP_HELP = "see docs/benchmarks.md#llamacpp-on-the-same-weights"


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-cpp", type=Path, default=os.environ.get("LLAMA_CPP_DIR"),
                   help="llama.cpp source tree holding convert_hf_to_gguf.py (default $LLAMA_CPP_DIR)")
    p.add_argument("--checkpoint", type=Path, help="an Apple-layout checkpoint folder (config.json + safetensors)")
    p.add_argument("--preset", default="OpenELM-270M", help="random weights of this size when no --checkpoint")
    p.add_argument("--precisions", default="bf16,f16,q8,q4",
                   help=f"comma-separated pairs out of {', '.join(PAIRS)} (default all)")
    p.add_argument("--prompt-tokens", type=_int_list, default=[32, 128, 512], help="comma-separated (default "
                   "32,128,512)")
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--threads", type=int, default=_usable_cores(), help="llama.cpp's threads, prompt and decode "
                   "(default: every core this process may use)")
    p.add_argument("--flash-attn", action="store_true", help="llama.cpp with flash attention (llama-cpp-python's "
                   "default is without)")
    p.add_argument("--agree-tokens", type=int, default=8, help="first greedy tokens both sides must agree on, "
                   "on the float pairs (default 8)")
    p.add_argument("--work-dir", type=Path, help="keep the converted models here, reused by later runs (one "
                   "folder per checkpoint; default: a temporary folder)")
    p.add_argument("--json", type=Path, help="output (default benchmarks/results/compare-llama-cpp-NAME.json; "
                   "the Markdown table beside it)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    """The precision pairs to run; one clear ValueError for anything unusable, before anything is converted."""
    for n in args.prompt_tokens or [0]:
        check_counts(n, args.gen_tokens, args.trials)
    pairs = [p for p in args.precisions.split(",") if p]
    bad = [p for p in pairs if p not in PAIRS]
    if bad or not pairs:
        raise ValueError(f"--precisions: {', '.join(bad) or 'none given'}; choose from {', '.join(PAIRS)}")
    if args.threads < 1 or args.agree_tokens < 0 or args.agree_tokens > args.gen_tokens:
        raise ValueError("--threads must be >= 1 and --agree-tokens between 0 and --gen-tokens")
    if args.checkpoint and not (args.checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint} has no config.json: give an Apple-layout folder")
    return pairs


def llama_cpp_parts(source: Path | None) -> tuple[Any, Path]:
    """``(llama_cpp module, convert_hf_to_gguf.py)``, or one ValueError saying which part is missing."""
    try:
        import llama_cpp
    except ImportError:
        raise ValueError(f"llama-cpp-python is not installed: {LLAMA_CPP_HELP}") from None
    if source is None:
        raise ValueError(f"no llama.cpp source tree: pass --llama-cpp DIR or set LLAMA_CPP_DIR ({LLAMA_CPP_HELP})")
    script = source / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ValueError(f"--llama-cpp {source} has no convert_hf_to_gguf.py: give a llama.cpp source tree")
    for module in ("torch", "transformers"):  # looked up, not imported: the converter runs in its own process
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"llama.cpp's converter needs {module}, not installed: {LLAMA_CPP_HELP}")
    return llama_cpp, script


def random_checkpoint(name: str, folder: Path) -> Path:
    """Random float32 weights of preset ``name`` in Apple's layout (its tensor names and config keys); one written
    there before (same seed) is kept."""
    if (folder / "config.json").is_file():
        return folder
    model = random_model(preset(name), dtype="float32", seed=0)
    return save(model, folder, config={"architectures": ["OpenELMForCausalLM"], "torch_dtype": "float32"})


def gguf(llama_cpp: Any, script: Path, checkpoint: Path, kind: str, work: Path) -> Path:
    """llama.cpp's own conversion of ``checkpoint`` to GGUF type ``kind`` (Q4_0 quantized from the BF16 file),
    written under a temporary name and renamed when complete."""
    out = work / f"llama-{kind}.gguf"
    if out.exists():
        return out
    part = out.with_suffix(".part")
    if kind == "Q4_0":
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        source = gguf(llama_cpp, script, checkpoint, "BF16", work)
        if llama_cpp.llama_model_quantize(str(source).encode(), str(part).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {source} to Q4_0")
    else:
        run = subprocess.run([sys.executable, str(script), str(checkpoint), "--outtype", kind.lower(), "--outfile",
                              str(part)], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"llama.cpp's converter failed on {checkpoint}:\n{run.stderr[-2000:]}")
    return part.rename(out)


def ours(checkpoint: Path, pair: str, work: Path) -> Path:
    out = work / f"mlx-{pair}"
    if not out.exists():
        convert(checkpoint, out, tokenizer_rebuild=False, **PAIRS[pair][1])
    return out


def open_llama(llama_cpp: Any, path: Path, context: int, threads: int, flash_attn: bool) -> Any:
    """Every layer on the GPU when llama.cpp was built with one (Metal on a Mac; llama-cpp-python's default keeps
    them on the CPU), the CPU otherwise."""
    return llama_cpp.Llama(str(path), n_gpu_layers=-1, n_ctx=context, n_threads=threads, n_threads_batch=threads,
                           flash_attn=flash_attn, verbose=False)


def llama_step(llm: Any):
    """A generator with the project's ``step(prompt, model, max_tokens)`` shape over llama.cpp, greedy, from an
    empty context each time (so the same timing code measures both sides)."""

    def step(prompt: mx.array, _model: Any, max_tokens: int) -> Iterator[tuple[int, None]]:
        llm.reset()
        for i, token in enumerate(llm.generate(prompt.tolist(), temp=0.0, top_k=1, reset=True)):
            yield token, None
            if i + 1 == max_tokens:
                return

    return step


def _timed(model: Any, step: Any, prompt: mx.array, gen_tokens: int) -> dict[str, Any]:
    cpu, wall = time.process_time(), time.perf_counter()
    t = time_generation(model, prompt, gen_tokens, step)
    cores = (time.process_time() - cpu) / (time.perf_counter() - wall)
    return {"prompt_tps": t.prompt_tps, "generation_tps": t.generation_tps, "ttft_s": t.ttft_s, "cores": cores,
            "tokens": t.tokens}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _rss_growth(run: Callable[[], Any]) -> int:
    """Peak resident-set growth while ``run()`` runs: from the kernel's high-water mark, reset first (Linux), else
    from the process's peak (macOS; it then includes anything before that peaked higher)."""
    if Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _status_bytes("VmRSS")
        run()
        return _status_bytes("VmHWM") - before
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # bytes on macOS (the only such system)


def memory_probe(side: str, path: Path, prompt_tokens: int, gen_tokens: int, threads: int, flash_attn: bool) -> int:
    """In a child process: load ``path`` on ``side`` and generate once; the peak resident-set growth in bytes."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import compare_llama_cpp as c; "
            "print(json.dumps(c._probe(*json.loads(sys.argv[2]))))")
    probe = json.dumps([side, str(path), prompt_tokens, gen_tokens, threads, flash_attn])
    run = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), probe], capture_output=True,
                         text=True)
    if run.returncode != 0:
        raise RuntimeError(f"the memory probe of {side} on {path} failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.splitlines()[-1])


def _probe(side: str, path: str, prompt_tokens: int, gen_tokens: int, threads: int, flash_attn: bool) -> int:
    import llama_cpp  # both libraries resident before the baseline, as in the timed process

    def load_and_generate() -> None:
        if side == "llama.cpp":
            model = open_llama(llama_cpp, Path(path), prompt_tokens + gen_tokens, threads, flash_attn)
            step = llama_step(model)
        else:
            model, step = load_model(path, dtype="auto"), None
        prompt = mx.random.randint(0, 256, (prompt_tokens,), key=mx.random.key(1))
        time_generation(model, prompt, gen_tokens, step)

    return _rss_growth(load_and_generate)


def agreement(tokens: dict[str, list[int]], n: int) -> dict[str, Any]:
    """How many of the first ``n`` greedy tokens agree, and the first step where they differ."""
    a, b = (tokens[s][:n] for s in SIDES)
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return {"checked": n, "agree": n if first is None else first, "first_difference": first,
            "mlx-openelm": a, "llama.cpp": b}


def measure(llama_cpp: Any, pair: str, paths: dict[str, Path], args: argparse.Namespace,
            vocab: int) -> list[dict[str, Any]]:
    """Both sides at every prompt length for one precision pair: alternating trials, medians and ratios."""
    context = max(args.prompt_tokens) + args.gen_tokens
    models = {"mlx-openelm": load_model(paths["mlx-openelm"], dtype="auto"),  # the project's default path
              "llama.cpp": open_llama(llama_cpp, paths["llama.cpp"], context, args.threads, args.flash_attn)}
    steps = {"mlx-openelm": None, "llama.cpp": llama_step(models["llama.cpp"])}
    compute = str(cache_dtype(models["mlx-openelm"])).removeprefix("mlx.core.")
    rows = []
    for n in args.prompt_tokens:
        prompt = mx.random.randint(0, vocab, (n,), key=mx.random.key(n))
        for side in SIDES:  # warm-up, discarded
            _timed(models[side], steps[side], prompt, args.gen_tokens)
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
        for i in range(args.trials):
            for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                runs[side].append(_timed(models[side], steps[side], prompt, args.gen_tokens))
                print(f"  {pair} prompt {n}: {side} trial {i + 1}/{args.trials}: "
                      f"{runs[side][-1]['generation_tps']:.1f} tok/s", file=sys.stderr)
        tokens = {s: runs[s][0]["tokens"] for s in SIDES}
        for r in (r for rs in runs.values() for r in rs):
            del r["tokens"]
        median = {s: {k: statistics.median(r[k] for r in runs[s]) for k in KEYS} for s in SIDES}
        rows.append({
            "precision": pair, "gguf_type": PAIRS[pair][0], "compute_dtype": compute, "prompt_tokens": n,
            "gen_tokens": args.gen_tokens, "trials": runs, "median": median,
            "ratio": {k: median["mlx-openelm"][k] / median["llama.cpp"][k] for k in KEYS[:3]},
            "agreement": agreement(tokens, args.agree_tokens) if pair in FLOAT_PAIRS else None,
        })
    memory = {s: memory_probe(s, paths[s], max(args.prompt_tokens), args.gen_tokens, args.threads, args.flash_attn)
              for s in SIDES}
    sizes = {"mlx-openelm": sum(f.stat().st_size for f in paths["mlx-openelm"].glob("*.safetensors")),
             "llama.cpp": paths["llama.cpp"].stat().st_size}
    for row in rows:
        row["peak_rss_growth_bytes"], row["file_bytes"] = memory, sizes
        row["ratio"]["peak_rss_growth"] = memory["mlx-openelm"] / max(memory["llama.cpp"], 1)
    return rows


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    pairs = check_args(args)
    llama_cpp, script = llama_cpp_parts(args.llama_cpp)
    if args.checkpoint:  # converted models live in a folder of their own checkpoint's
        checkpoint = args.checkpoint
        key = hashlib.sha256(str(checkpoint.resolve()).encode() + (checkpoint / "config.json").read_bytes())
        work = work / f"{checkpoint.name}-{key.hexdigest()[:12]}"
    else:
        work = work / f"{args.preset}-random"
        checkpoint = random_checkpoint(args.preset, work / "checkpoint")
    work.mkdir(parents=True, exist_ok=True)
    config = json.loads((checkpoint / "config.json").read_text())
    vocab, positions = config["vocab_size"], config.get("max_context_length", 2048)
    if max(args.prompt_tokens) + args.gen_tokens > positions:
        raise ValueError(f"--prompt-tokens + --gen-tokens exceed the model's {positions} positions")
    rows = []
    for pair in pairs:
        print(f"converting {checkpoint.name} to {PAIRS[pair][0]} and MLX {pair}", file=sys.stderr)
        paths = {"llama.cpp": gguf(llama_cpp, script, checkpoint, PAIRS[pair][0], work),
                 "mlx-openelm": ours(checkpoint, pair, work)}
        rows += measure(llama_cpp, pair, paths, args, vocab)
    disagreements = [r for r in rows if r["agreement"] and r["agreement"]["first_difference"] is not None]
    return {
        "model": args.checkpoint.name if args.checkpoint else f"{args.preset} (random weights)",
        "threads": args.threads, "flash_attn": args.flash_attn,
        "llama_cpp_gpu": llama_cpp.llama_supports_gpu_offload(), "rows": rows, "tokens_agree": not disagreements,
        "versions": {"mlx-openelm": __version__, "mlx": mx.__version__, "llama-cpp-python": llama_cpp.__version__},
        "llama_cpp_system": llama_cpp.llama_print_system_info().decode().strip(),
        "device": device_info(), "decode": describe(), "ld_preload": os.environ.get("LD_PRELOAD"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def table(record: dict[str, Any]) -> str:
    """Markdown: one line per precision pair and prompt length, ours / llama.cpp for each figure."""
    d, v = record["device"], record["versions"]
    lines = [f"{record['model']} on {device_label(d)} ({d['os']}); mlx-openelm {v['mlx-openelm']} on MLX {v['mlx']} "
             f"({d['backend']}), llama.cpp through llama-cpp-python {v['llama-cpp-python']} "
             f"({'every layer on the GPU' if record['llama_cpp_gpu'] else 'CPU build'}) with "
             f"{record['threads']} threads, flash attention {'on' if record['flash_attn'] else 'off'}. Medians; "
             "ratio = ours / llama.cpp (above 1: we are faster).", "",
             "| pair | prompt | prompt tok/s (ours, llama.cpp, ratio) | generation tok/s (ours, llama.cpp, ratio) "
             "| first token s (ours, llama.cpp) | cores used | peak RSS growth MB | file MB | greedy agree |",
             "|---|---:|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        m, q = r["median"], r["ratio"]
        ours_, theirs = m["mlx-openelm"], m["llama.cpp"]
        mem, size = r["peak_rss_growth_bytes"], r["file_bytes"]
        agree = "n/a" if not r["agreement"] else f"{r['agreement']['agree']}/{r['agreement']['checked']}"
        lines.append(
            f"| {r['precision']} vs {r['gguf_type']} | {r['prompt_tokens']} "
            f"| {ours_['prompt_tps']:.1f}, {theirs['prompt_tps']:.1f}, **{q['prompt_tps']:.2f}x** "
            f"| {ours_['generation_tps']:.1f}, {theirs['generation_tps']:.1f}, **{q['generation_tps']:.2f}x** "
            f"| {ours_['ttft_s']:.3f}, {theirs['ttft_s']:.3f} | {ours_['cores']:.1f}, {theirs['cores']:.1f} "
            f"| {mem['mlx-openelm'] / 1e6:.0f}, {mem['llama.cpp'] / 1e6:.0f} "
            f"| {size['mlx-openelm'] / 1e6:.1f}, {size['llama.cpp'] / 1e6:.1f} | {agree} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = (args.checkpoint.name if args.checkpoint else args.preset)
    try:
        out = check_output(args.json or RESULTS / f"compare-llama-cpp-{name}.json")
        if args.work_dir:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            record = run(args, args.work_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="compare-llama-cpp-") as tmp:
                record = run(args, Path(tmp))
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = table(record)
    print(text)
    for r in record["rows"]:
        if r["agreement"] and r["agreement"]["first_difference"] is not None:
            print(f"DISAGREEMENT: {r['precision']} prompt {r['prompt_tokens']}: greedy tokens differ at step "
                  f"{r['agreement']['first_difference']}: {r['agreement']}")
    write_json(out, record)
    write_atomic(out.with_suffix(".md"), text + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if record["tokens_agree"] else 2


if __name__ == "__main__":
    sys.exit(main())
