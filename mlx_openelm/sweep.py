"""The paper-style table: each model size x (unquantized, 8-bit, 4-bit), as Markdown, JSON and (matplotlib) a PNG;
and :func:`run_bench`, the ``bench`` command's one call (a single model or the sweep)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .bench import (
    SWEEP_PRECISIONS,
    BenchResult,
    Progress,
    bench,
    check_counts,
    check_output,
    decode_path,
    device_label,
    parameter_count,
    prepare_model,
    result_table,
    summary_lines,
    write_atomic,
    write_json,
)
from .chart import INSTALL, bar_chart_png, chart_available
from .config import PRESETS, ModelArgs, preset
from .device import device_info, memory_bandwidth
from .hub import generation_options


def parse_sizes(text: str) -> list[str]:
    """``"270M,1_1B"`` (short or full preset names, comma-separated) -> preset names."""
    by_short = {p.removeprefix("OpenELM-").lower(): p for p in PRESETS}
    by_short["1.1b"] = "OpenELM-1_1B"
    sizes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name = by_short.get(item.lower().removeprefix("openelm-"))
        if name is None:
            raise ValueError(f"unknown size {item!r} in --sizes; choose from {', '.join(by_short)}")
        sizes.append(name)
    if not sizes:
        raise ValueError("--sizes is empty: give sizes such as 270M,450M")
    return sizes


def default_sizes(
    memory_bytes: int | None, bandwidth_gbps: float, prompt_tokens: int, gen_tokens: int, trials: int,
    budget_s: float = 900.0,
) -> list[str]:
    """The sizes whose bfloat16 weights use at most half the memory and whose three precisions are estimated
    (every token read at ``bandwidth_gbps``) to finish within ``budget_s``; the smallest size at least."""
    fits = []
    for name in PRESETS:
        nbytes = 2 * parameter_count(preset(name))
        seconds = len(SWEEP_PRECISIONS) * (trials + 1) * (prompt_tokens + gen_tokens) * nbytes / (bandwidth_gbps * 1e9)
        if (memory_bytes is None or 2 * nbytes <= memory_bytes) and seconds <= budget_s:
            fits.append(name)
    return fits or [PRESETS[0]]


def precision_label(result: BenchResult) -> str:
    """``"bfloat16"``, or ``"4-bit"`` for a quantized run."""
    return f"{result.q_bits}-bit" if result.q_bits else result.dtype


def sweep(
    sizes: list[str | ModelArgs] | None = None,
    *,
    dtype: str | None = None,
    precisions: tuple[int | None, ...] = SWEEP_PRECISIONS,
    prompt_tokens: int = 128,
    gen_tokens: int = 128,
    trials: int = 3,
    q_group_size: int = 64,
    seed: int = 0,
    progress: Progress | None = None,
    bandwidth: tuple[float, str] | None = None,
) -> list[BenchResult]:
    """Benchmark random weights of each size at each precision (bits; ``None`` = unquantized).

    Weights are bfloat16 unless ``dtype``; without ``dtype`` quantized runs compute in the project's default
    dtype for the backend (see :func:`prepare_model`). ``sizes`` defaults to :func:`default_sizes`. The
    bandwidth (GB/s, source) is measured around each run's trials unless given (load changes in a long sweep).
    """
    check_counts(prompt_tokens, gen_tokens, trials)
    device = device_info()
    if sizes is None:
        gbps = (bandwidth or memory_bandwidth(device))[0]
        sizes = default_sizes(device["memory_bytes"], gbps, prompt_tokens, gen_tokens, trials)
    results = []
    for size in sizes:
        for bits in precisions:
            model, label = prepare_model(size, None, dtype, bits, q_group_size, seed)
            tag = f"{label} {f'{bits}-bit' if bits else dtype or 'bfloat16'}"
            results.append(bench(
                model, label, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, trials=trials, seed=seed,
                q_bits=bits, q_group_size=q_group_size, device=device, bandwidth=bandwidth,
                progress=progress and (lambda desc, done, total, tag=tag: progress(f"{tag}: {desc}", done, total)),
            ))
            del model
            mx.clear_cache()
    return results


def sweep_markdown(results: list[BenchResult]) -> str:
    """A Markdown table (median of the trials) with the device and settings above it."""
    r0 = results[0]
    d = r0.device
    gbps = sorted({f"{r.bandwidth_gbps:.1f}" for r in results}, key=float)
    lines = [
        f"Device: {device_label(d)}, MLX {d['mlx_version']} "
        f"({d['backend']}); bandwidth {' to '.join(dict.fromkeys([gbps[0], gbps[-1]]))} GB/s "
        f"({r0.bandwidth_source}). "
        f"{r0.prompt_tokens} prompt + {r0.gen_tokens} generated tokens, median of {len(r0.trials)} trials "
        "after a warm-up; random weights, greedy. Decode path: " + "; ".join(dict.fromkeys(
            decode_path(r.decode) for r in results)) + ".",
        "",
        "| model | precision | compute dtype | params (M) | weights (GB) | prompt tok/s | generation tok/s "
        "| TTFT (s) | peak memory (GB) | roofline | kernels |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        kernels = f"{r.decode.get('kernels')}{' FALLBACK' if r.decode.get('fallback') else ''}"
        lines.append(
            f"| {r.model} | {precision_label(r)} | {r.dtype} | {r.parameters / 1e6:.1f} | {r.model_bytes / 1e9:.3f} "
            f"| {r.median('prompt_tps'):.2f} | {r.median('generation_tps'):.2f} | {r.median('ttft_s'):.3f} "
            f"| {r.median('peak_memory_bytes') / 1e9:.3f} | {100 * r.roofline_fraction:.1f}% | {kernels} |"
        )
    return "\n".join(lines) + "\n"


def sweep_chart(results: list[BenchResult]) -> bytes:
    """PNG: prompt and generation tokens/s by size, one bar series per precision."""
    groups = list(dict.fromkeys(r.model.removeprefix("OpenELM-") for r in results))
    series = list(dict.fromkeys(precision_label(r) for r in results))
    found = {(r.model.removeprefix("OpenELM-"), precision_label(r)): r for r in results}

    def values(field: str) -> list[list[float]]:
        return [[found[g, s].median(field) if (g, s) in found else float("nan") for g in groups] for s in series]

    d = results[0].device
    caption = f"{device_label(d)} - MLX {d['mlx_version']} {d['backend']}"
    return bar_chart_png(
        [("prompt tok/s", groups, series, values("prompt_tps")),
         ("generation tok/s", groups, series, values("generation_tps"))],
        caption,
    )


def sweep_paths(prefix: str | Path, chart: bool | None = None) -> list[Path]:
    """``PREFIX.md``, ``PREFIX.json`` and (when matplotlib is installed, or ``chart``) ``PREFIX.png``, checked
    writable (call it before a long sweep)."""
    prefix = Path(prefix)
    exts = (".md", ".json", ".png") if (chart_available() if chart is None else chart) else (".md", ".json")
    return [check_output(prefix.with_name(prefix.name + ext)) for ext in exts]


def write_sweep(results: list[BenchResult], prefix: str | Path) -> list[Path]:
    """Write the Markdown table, the JSON of every run and, with matplotlib, the PNG chart, each atomically;
    returns their paths."""
    paths = sweep_paths(prefix)
    write_atomic(paths[0], sweep_markdown(results))
    write_json(paths[1], {"results": [r.to_dict() for r in results]})
    if len(paths) > 2:
        write_atomic(paths[2], sweep_chart(results))
    return paths


@dataclass(frozen=True)
class BenchReport:
    """What :func:`run_bench` leaves to print: a table of trials (single model), text, notes for stderr, files."""

    table: tuple[list[str], list[list[str]]] | None
    text: str
    notes: list[str]
    paths: list[Path]


def run_bench(
    model: str | None = None, preset_name: str | None = None, dtype: str | None = None, q_bits: int | None = None, *,
    prompt_tokens: int = 128, gen_tokens: int = 128, trials: int = 3, json_path: str | Path | None = None,
    sweep_all: bool = False, sizes: str | None = None, out: str | Path | None = None, draft_model: str | None = None,
    num_draft_tokens: int = 3, prompt_lookup: int | None = None, progress: Progress | None = None,
) -> BenchReport:
    """Benchmark one model (``model``, else random weights of ``preset_name``, optionally drafting) or, with
    ``sweep_all``, every size of ``sizes`` at each precision into ``out`` (a prefix). The options are checked
    together and the outputs checked writable before anything loads; the results are written before returning."""
    check_counts(prompt_tokens, gen_tokens, trials)
    if model and preset_name:
        raise ValueError("give --model or --preset, not both")
    if sweep_all and (model or preset_name or q_bits or json_path or draft_model or prompt_lookup):
        raise ValueError("--sweep benchmarks random weights at every precision into --out: drop --model, --preset, -q, "
                         "--json and the speculative options")
    if not sweep_all and (sizes or out):
        raise ValueError("--sizes and --out belong to --sweep: add --sweep, or drop them")
    counts = dict(prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, trials=trials)
    if sweep_all:
        out, size_list = Path(out or "openelm-sweep"), parse_sizes(sizes) if sizes else None
        sweep_paths(out)  # writable: checked before the long run
        results = sweep(size_list, dtype=dtype, progress=progress, **counts)
        paths = write_sweep(results, out)
        return BenchReport(None, sweep_markdown(results), [] if len(paths) > 2 else
                           [f"no PNG chart: it needs matplotlib ({INSTALL})"], paths)
    if json_path:
        check_output(json_path)
    if (draft_model or prompt_lookup) and not model:
        raise ValueError("speculative decoding needs a real model: give --model (random weights repeat one token)")
    spec = generation_options(model, None, draft_model, num_draft_tokens, prompt_lookup) if model else {}
    net, label = prepare_model(preset_name or "OpenELM-270M", model, dtype, q_bits)
    result = bench(net, label, q_bits=q_bits, q_group_size=64, progress=progress, speculative=spec,
                   draft_label=draft_model, **counts)
    paths = [write_json(json_path, result.to_dict())] if json_path else []
    return BenchReport(result_table(result), "\n".join(summary_lines(result)), [], paths)
