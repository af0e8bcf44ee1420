"""The ``mlx-openelm`` command line: parse, call the library, print. No logic lives here.

Eight commands share their option types and error handling here, hence the length (the style budget is 250).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="mlx-openelm",
    help="Apple's OpenELM on MLX: convert checkpoints, generate, chat, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Errors a user can fix (bad values, files, the hub, the disk): printed as one line, exit code 1, no traceback.
USER_ERRORS = (ValueError, OSError)


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


tokenizer_app = typer.Typer(help="Get the Llama-2 tokenizer OpenELM uses (not in Apple's repos).",
                            no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("fetch")
def tokenizer_fetch(
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for tokenizer.model/.json/_config.json.")],
    tokenizer: Annotated[str | None, typer.Option(help="A tokenizer.model, its folder, or a HF repo id.")] = None,
    from_file: Annotated[Path | None, typer.Option(help="A downloaded llama-tokenizer-js-1.2.2.tgz or "
                                                        "llama_cpp_python-0.3.36.tar.gz to rebuild from.")] = None,
    instruct: Annotated[bool, typer.Option(help="Store the OpenELM-Instruct chat template.")] = False,
) -> None:
    """Write Meta's Llama-2 tokenizer (sha256 checked), rebuilt from public packages when needed."""
    from mlx_openelm.tokenizer_fetch import fetch_tokenizer

    if tokenizer is not None and from_file is not None:
        fail("give --tokenizer or --from-file, not both")
    if from_file is not None and not from_file.is_file():
        raise FileNotFoundError(f"--from-file {from_file}: no such file")
    result = fetch_tokenizer(output, tokenizer=str(from_file) if from_file else tokenizer, instruct=instruct)
    typer.echo(f"{result.path}: {result.note} (route: {result.route})")
    typer.echo(f"sha256 {result.sha256}")


@app.command("convert")
def convert_command(
    source: Annotated[str, typer.Argument(help="Checkpoint folder or Hugging Face repo id (apple/OpenELM-270M).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (must not exist).")],
    dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32.")] = "bfloat16",
    quantize: Annotated[bool, typer.Option("-q", "--quantize", help="Quantize weights (affine).")] = False,
    q_bits: Annotated[int | None, typer.Option(help="Bits: 2, 3, 4, 5, 6 or 8 (default 4).")] = None,
    q_group_size: Annotated[int, typer.Option(help="Group size: 32, 64 or 128.")] = 64,
    q_recipe: Annotated[str | None, typer.Option(help="Mixed bits: mixed_4_6 (4-bit body; 6-bit embeddings/head, "
                                                      "sensitive layers), mixed_4_8, mixed_3_6, mixed_2_6.")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="A tokenizer.model, a folder with one, or a repo id.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    force_float16: Annotated[bool, typer.Option(help="Allow float16 for 3B (its activations overflow).")] = False,
    allow_bin: Annotated[bool, typer.Option(help="Read pytorch_model.bin with torch weights_only.")] = False,
) -> None:
    """Convert an OpenELM checkpoint (Hugging Face safetensors) into an MLX model folder."""
    from mlx_openelm.convert import convert
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("converting", total=None)
        result = convert(source, output, dtype=dtype, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
                         q_recipe=q_recipe, tokenizer=tokenizer, revision=revision, force=force,
                         force_float16=force_float16, allow_bin=allow_bin,
                         progress=lambda done, total: bar.update(task, completed=done, total=total))
    for line in result.summary():
        typer.echo(line)


@app.command("bench")
def bench_command(
    model: Annotated[str | None, typer.Option(help="Converted folder or repo id (default: random weights).")] = None,
    preset: Annotated[str | None, typer.Option(help="Random-weight size (default OpenELM-270M).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: bfloat16 weights, "
                                                   "the backend's fastest compute for quantized ones).")] = None,
    q_bits: Annotated[int | None, typer.Option("-q", "--q-bits", help="Quantize in memory: 2-6 or 8 bits.")] = None,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length (random token ids).")] = 128,
    gen_tokens: Annotated[int, typer.Option(help="Tokens generated per trial (greedy).")] = 128,
    trials: Annotated[int, typer.Option(help="Timed trials after one warm-up.")] = 3,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every figure to this JSON file.")] = None,
    sweep: Annotated[bool, typer.Option(help="Each size x (bfloat16, 8-bit, 4-bit): Markdown, JSON, PNG.")] = False,
    sizes: Annotated[str | None, typer.Option(help="Sweep sizes, e.g. 270M,450M (default: what fits).")] = None,
    out: Annotated[Path | None, typer.Option(help="Sweep output prefix: PREFIX.md, .json, .png "
                                                  "(default openelm-sweep).")] = None,
    draft_model: DraftModel = None, num_draft_tokens: NumDraftTokens = 3, prompt_lookup: PromptLookup = None,
) -> None:
    """Tokens/s, time to first token, peak memory and the bandwidth roofline reached (warm-up + trials)."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from mlx_openelm import bench as b
    from mlx_openelm import sweep as s
    from mlx_openelm.chart import INSTALL as INSTALL_CHART

    b.check_counts(prompt_tokens, gen_tokens, trials)
    if model and preset:
        fail("give --model or --preset, not both")
    if sweep and (model or preset or q_bits or json_path or draft_model or prompt_lookup):
        fail("--sweep benchmarks random weights at every precision into --out: drop --model, --preset, -q, --json "
             "and the speculative options")
    if not sweep and (sizes or out):
        fail("--sizes and --out belong to --sweep: add --sweep, or drop them")
    out = out or Path("openelm-sweep")
    size_list = s.parse_sizes(sizes) if sizes else None
    paths = s.sweep_paths(out) if sweep else [b.check_output(json_path)] if json_path else []
    counts = dict(prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, trials=trials)
    with Progress(console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("loading", total=None)

        def progress(desc: str, done: int, total: int) -> None:
            bar.update(task, description=desc, completed=done, total=total)

        if sweep:
            results = s.sweep(size_list, dtype=dtype, progress=progress, **counts)
        else:
            spec = speculative_options(model, draft_model, num_draft_tokens, prompt_lookup) if model else {}
            if (draft_model or prompt_lookup) and not model:
                fail("speculative decoding needs a real model: give --model (random weights repeat one token)")
            net, label = b.prepare_model(preset or "OpenELM-270M", model, dtype, q_bits)
            results = [b.bench(net, label, q_bits=q_bits, q_group_size=64, progress=progress, speculative=spec,
                               draft_label=draft_model, **counts)]
    if sweep:
        paths = s.write_sweep(results, out)
        typer.echo(s.sweep_markdown(results))
        if len(paths) < 3:
            typer.echo(f"no PNG chart: it needs matplotlib ({INSTALL_CHART})", err=True)
    else:
        headers, rows = b.result_table(results[0])
        table = Table(*headers)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        typer.echo("\n".join(b.summary_lines(results[0])))
        if json_path:
            b.write_json(json_path, results[0].to_dict())
    for p in paths:
        typer.echo(f"wrote {p}")


# Sampling options shared by the commands that generate text.
Temp = Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")]
TopP = Annotated[float, typer.Option(help="Keep the most likely tokens up to this probability mass (1: off).")]
TopK = Annotated[int, typer.Option(help="Keep only the k most likely tokens (0: off).")]
MinP = Annotated[float, typer.Option(help="Drop tokens below min-p times the top probability (0: off).")]
RepetitionPenalty = Annotated[float | None, typer.Option(help="Penalize repeated tokens (Apple suggests 1.2).")]
Seed = Annotated[int | None, typer.Option(help="Random seed for sampling.")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate (per reply in chat).")]
DraftModel = Annotated[str | None, typer.Option(help="Speculative decoding with this draft model (folder or repo "
                                                     "id; same tokenizer, e.g. OpenELM-270M).")]
NumDraftTokens = Annotated[int, typer.Option(help="Tokens drafted per target pass (speculative decoding).")]
PromptLookup = Annotated[int | None, typer.Option(help="Speculative decoding drafting from the text itself: what "
                                                      "followed the last N tokens earlier (N, e.g. 3).")]
AdapterPath = Annotated[Path | None, typer.Option(help="A LoRA adapter folder from mlx_lm.lora, fused at load.")]


def speculative_options(model: str, draft_model: str | None, num_draft_tokens: int, prompt_lookup: int | None):
    """``(options for generate_step, the draft model)``, the draft checked against ``model`` before loading."""
    from mlx_openelm.hub import load_draft
    from mlx_openelm.speculative import PromptLookup as Lookup

    if draft_model and prompt_lookup is not None:
        fail("give --draft-model or --prompt-lookup, not both")
    if num_draft_tokens < 1:
        fail(f"--num-draft-tokens must be >= 1, got {num_draft_tokens}")
    if prompt_lookup is not None:
        Lookup(prompt_lookup)  # validates N
        return {"prompt_lookup": prompt_lookup, "num_draft_tokens": num_draft_tokens}
    if draft_model:
        return {"draft_model": load_draft(draft_model, model), "num_draft_tokens": num_draft_tokens}
    return {}


@app.command("generate")
def generate_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Converted model folder, or a Hugging Face repo id "
                                                             "(converted into the user's cache on first use).")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text; - reads it from stdin.")],
    temp: Temp = 0.0, top_p: TopP = 1.0, top_k: TopK = 0, min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = None, seed: Seed = None, max_tokens: MaxTokens = 256,
    stop: Annotated[list[str] | None, typer.Option(help="Stop before this text (repeatable).")] = None,
    max_kv_size: Annotated[int | None, typer.Option(help="Rotating KV cache of N tokens (passes the context limit).")]
    = None,
    kv_bits: Annotated[int | None, typer.Option(help="Quantize the KV cache: 4 or 8 bits.")] = None,
    dtype: Annotated[str, typer.Option(help="auto (per backend), float32, bfloat16 or float16.")] = "auto",
    no_compile: Annotated[bool, typer.Option("--no-compile", help="Decode with the model's own uncompiled forward "
                                                                  "pass (same tokens, slower).")] = False,
    draft_model: DraftModel = None, num_draft_tokens: NumDraftTokens = 3, prompt_lookup: PromptLookup = None,
    adapter_path: AdapterPath = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
) -> None:
    """Generate text from a prompt: text streams to stdout, a stats line to stderr."""
    import json

    from mlx_openelm import load, make_logits_processors, make_sampler, stream_generate

    if max_tokens < 1:
        fail(f"--max-tokens must be at least 1, got {max_tokens}")
    if prompt == "-":
        try:
            prompt = sys.stdin.read()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read the prompt from stdin: {e}")
    if not prompt:
        fail("the prompt is empty: give some text with --prompt")
    sampler = make_sampler(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    processors = make_logits_processors(repetition_penalty=repetition_penalty)
    spec = speculative_options(model, draft_model, num_draft_tokens, prompt_lookup)
    net, tokenizer = load(model, dtype=dtype, adapter_path=adapter_path)
    responses = []
    for r in stream_generate(net, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler, stop=stop or (),
                             logits_processors=processors, max_kv_size=max_kv_size, kv_bits=kv_bits,
                             compile=not no_compile, **spec):
        responses.append(r)
        if not json_out:
            typer.echo(r.text, nl=False)
            sys.stdout.flush()
    last = responses[-1]
    stats = {"finish_reason": last.finish_reason, "prompt_tps": last.prompt_tps, "generation_tps":
             last.generation_tps, "peak_memory_gb": last.peak_memory}
    if spec:
        stats |= {"acceptance_rate": last.acceptance_rate, "tokens_per_pass": last.tokens_per_pass}
    if json_out:
        typer.echo(json.dumps({"text": "".join(r.text for r in responses), "prompt_tokens": tokenizer.encode(prompt),
                               "tokens": [r.token for r in responses], **stats}, ensure_ascii=False))
    else:
        typer.echo()
        speculative = (f" | {100 * last.acceptance_rate:.0f}% of drafts accepted, {last.tokens_per_pass:.2f} "
                       "tokens/pass") if spec else ""
        typer.echo(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | generation: "
                   f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s{speculative} | peak memory "
                   f"{last.peak_memory:.2f} GB | {last.finish_reason}", err=True)


@app.command("chat")
def chat_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Converted model folder, or a repo id (converted on "
                                                             "first use).")],
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    chat_template: Annotated[Path | None, typer.Option(help="Jinja chat template file (replaces the model's).")] = None,
    temp: Temp = 0.0, top_p: TopP = 1.0, top_k: TopK = 0, min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = None, seed: Seed = None, max_tokens: MaxTokens = 256,
    draft_model: DraftModel = None, num_draft_tokens: NumDraftTokens = 3, prompt_lookup: PromptLookup = None,
    adapter_path: AdapterPath = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Per turn: tokens prefilled, speeds.")] = False,
) -> None:
    """Chat in the terminal; the KV cache is kept across turns (/help lists the commands)."""
    from mlx_openelm import load
    from mlx_openelm.chat import ChatSession
    from mlx_openelm.chat_terminal import run_chat
    from mlx_openelm.sample import make_logits_processors, make_sampler

    if max_tokens < 1:
        fail(f"--max-tokens must be at least 1, got {max_tokens}")
    sampler, processors = make_sampler(temp, top_p, top_k, min_p, seed), make_logits_processors(repetition_penalty)
    spec = speculative_options(model, draft_model, num_draft_tokens, prompt_lookup)
    session = ChatSession(*load(model, chat_template=chat_template, adapter_path=adapter_path), system=system,
                          **spec)
    run_chat(session, verbose=verbose, banner=f"chatting with {model}: /help for commands, Ctrl-D to leave",
             max_tokens=max_tokens, sampler=sampler, logits_processors=processors)


@app.command("serve")
def serve_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Converted model folder or repo id.")],
    host: Annotated[str, typer.Option(help="Address to listen on (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together at most.")] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests waiting at most (then 503).")] = 32,
    api_key: Annotated[str | None, typer.Option(help="Require Authorization: Bearer KEY.", envvar=
                                                "MLX_OPENELM_API_KEY")] = None,
    draft_model: DraftModel = None, num_draft_tokens: NumDraftTokens = 3, adapter_path: AdapterPath = None,
    chat_template: Annotated[Path | None, typer.Option(help="Jinja chat template file (replaces the model's).")] = None,
) -> None:
    """An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models, /health)."""
    from mlx_openelm.server import serve

    if num_draft_tokens < 1:
        fail(f"--num-draft-tokens must be >= 1, got {num_draft_tokens}")
    serve(model, host=host, port=port, max_batch=max_batch, max_queue=max_queue, api_key=api_key,
          draft_model=draft_model, num_draft_tokens=num_draft_tokens, adapter_path=adapter_path,
          chat_template=chat_template)
    # The server has shut down cleanly. Skip the interpreter's teardown: MLX's per-thread C++ state of the
    # finished scheduler thread can be destroyed during it, which needs the GIL and aborts the process (SIGABRT,
    # measured in about 1 of 5 stops on mlx 0.32). Nothing is left to flush but the standard streams.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _main_rank() -> bool:
    from mlx_openelm.jobs.distributed import group

    return group().rank() == 0


@app.command("perplexity")
def perplexity_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Converted model folder or repo id.")],
    data: Annotated[Path, typer.Option(help="A text or JSONL (text field) file, or a folder of them.")],
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    stride: Annotated[int | None, typer.Option(help="Window start step; overlap is context only (default: seq-len)."
                                               )] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures to this JSON file.")] = None,
) -> None:
    """Token-weighted perplexity over a corpus; under mlx.launch the windows are shared among processes."""
    from rich.console import Console
    from rich.progress import Progress

    from mlx_openelm import load
    from mlx_openelm.bench import check_output, write_json
    from mlx_openelm.jobs.inputs import documents
    from mlx_openelm.jobs.perplexity import perplexity

    if json_path:
        check_output(json_path)
    documents(data)  # bad or empty input: one error before the model loads
    net, tokenizer = load(model, dtype=dtype)
    main_rank = _main_rank()
    with Progress(console=Console(stderr=True), transient=True, disable=not (main_rank and sys.stderr.isatty())) as bar:
        task = bar.add_task("scoring windows", total=None)
        result = perplexity(net, tokenizer, data, seq_len=seq_len, stride=stride, batch_size=batch_size,
                            progress=lambda done, total: bar.update(task, completed=done, total=total))
    if main_rank:
        typer.echo(f"perplexity {result.ppl:.4f} (nll {result.nll:.5f}) over {result.tokens} tokens in "
                   f"{result.windows} windows of {result.seq_len} (stride {result.stride}); {result.ranks} "
                   f"process(es), {result.tokens_per_second:.1f} tok/s, peak memory "
                   f"{result.peak_memory_bytes / 1e9:.3f} GB")
        if json_path:
            write_json(json_path, {"model": model, "data": str(data), **result.to_dict()})


@app.command("batch")
def batch_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Converted model folder or repo id.")],
    input_path: Annotated[Path, typer.Option("--input", help="JSONL: prompt or messages per line (id, max_tokens, "
                                                             "temperature, seed, stop optional).")],
    output: Annotated[Path, typer.Option(help="JSONL results, one per input line; a rerun skips ids already in "
                                              "it.")],
    temp: Temp = 0.0, top_p: TopP = 1.0, top_k: TopK = 0, min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = None, seed: Seed = None, max_tokens: MaxTokens = 256,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together.")] = 8,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
) -> None:
    """Generate for every prompt of a JSONL file, in batches; under mlx.launch the prompts are shared."""
    from rich.console import Console
    from rich.progress import Progress

    from mlx_openelm import load
    from mlx_openelm.hub import resolve_model
    from mlx_openelm.jobs.batch_generate import batch_generate, read_items
    from mlx_openelm.load import check_folder
    from mlx_openelm.tokenizer_fetch import load_tokenizer

    defaults = {"max_tokens": max_tokens, "temperature": temp, "top_p": top_p, "top_k": top_k, "min_p": min_p,
                "seed": seed, "repetition_penalty": repetition_penalty}
    folder = resolve_model(model)
    read_items(input_path, load_tokenizer(folder), check_folder(folder).max_context_length, defaults)  # before loading
    net, tokenizer = load(folder, dtype=dtype)
    main_rank = _main_rank()
    with Progress(console=Console(stderr=True), transient=True, disable=not (main_rank and sys.stderr.isatty())) as bar:
        task = bar.add_task("generating", total=None)
        counts = batch_generate(net, tokenizer, input_path, output, batch_size=batch_size, defaults=defaults,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
    if main_rank:
        typer.echo(f"wrote {counts['written']} results to {output} ({counts['skipped']} already there), "
                   f"{counts['completion_tokens']} tokens generated on {counts['ranks']} process(es)")


def main() -> None:
    """Console-script entry point: user errors become one line and a non-zero exit."""
    try:
        app()
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except USER_ERRORS as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
