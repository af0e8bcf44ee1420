"""The ``mlx-openelm`` command line: parse, call the library, print. Each check is made once, by the library where
the value is used; a user error it raises becomes one line and exit code 1 (``main``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(name="mlx-openelm", help="Apple's OpenELM on MLX: convert checkpoints, generate, chat, benchmark.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
tokenizer_app = typer.Typer(help="Get the Llama-2 tokenizer OpenELM uses (not in Apple's repos).",
                            no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")

# Errors a user can fix (bad values, files, the hub, the disk): printed as one line, exit code 1, no traceback.
USER_ERRORS = (ValueError, OSError)

# Options shared by several commands.
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
ChatTemplate = Annotated[Path | None, typer.Option(help="Jinja chat template file (replaces the model's).")]
ModelName = Annotated[str, typer.Option("--model", "-m", help="Converted model folder or repo id.")]
JobDtype = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]


@contextlib.contextmanager
def progress_bar(description: str, show: bool = True) -> Iterator[Callable[..., None]]:
    """A transient bar on stderr when it is a terminal; yields ``update(done, total, description=None)``."""
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True, disable=not (show and sys.stderr.isatty())) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total, description=None: bar.update(task, completed=done, total=total,
                                                               description=description)


def _main_rank() -> bool:
    from mlx_openelm.jobs.distributed import group

    return group().rank() == 0


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

    # --from-file is --tokenizer under its own name, for the messages: the library takes one source.
    if tokenizer is not None and from_file is not None:
        raise ValueError("give --tokenizer or --from-file, not both")
    if from_file is not None and not from_file.is_file():
        raise FileNotFoundError(f"--from-file {from_file}: no such file")
    result = fetch_tokenizer(output, tokenizer=str(from_file) if from_file else tokenizer, instruct=instruct)
    typer.echo(f"{result.path}: {result.note} (route: {result.route})\nsha256 {result.sha256}")


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

    with progress_bar("converting") as update:
        result = convert(source, output, dtype=dtype, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
                         q_recipe=q_recipe, tokenizer=tokenizer, revision=revision, force=force,
                         force_float16=force_float16, allow_bin=allow_bin, progress=update)
    typer.echo("\n".join(result.summary()))


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
    from rich.table import Table

    from mlx_openelm.sweep import run_bench

    with progress_bar("loading") as update:
        report = run_bench(model, preset, dtype, q_bits, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                           trials=trials, json_path=json_path, sweep_all=sweep, sizes=sizes, out=out,
                           draft_model=draft_model, num_draft_tokens=num_draft_tokens, prompt_lookup=prompt_lookup,
                           progress=lambda description, done, total: update(done, total, description))
    if report.table:
        table = Table(*report.table[0])
        for row in report.table[1]:
            table.add_row(*row)
        Console().print(table)
    typer.echo(report.text)
    for note in report.notes:
        typer.echo(note, err=True)
    for path in report.paths:
        typer.echo(f"wrote {path}")


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
    no_compile: Annotated[bool, typer.Option("--no-compile", help="Run the decode step op by op instead of "
                                                                  "compiled (same tokens, slower).")] = False,
    draft_model: DraftModel = None, num_draft_tokens: NumDraftTokens = 3, prompt_lookup: PromptLookup = None,
    adapter_path: AdapterPath = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
) -> None:
    """Generate text from a prompt: text streams to stdout, a stats line to stderr."""
    import json

    from mlx_openelm import load, make_logits_processors, make_sampler, stream_generate
    from mlx_openelm.hub import generation_options

    if prompt == "-":
        try:
            prompt = sys.stdin.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the prompt from stdin: {e}") from None
    sampler = make_sampler(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    processors = make_logits_processors(repetition_penalty=repetition_penalty)
    spec = generation_options(model, max_tokens, draft_model, num_draft_tokens, prompt_lookup)
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
    if json_out:
        drafts = {"acceptance_rate": last.acceptance_rate, "tokens_per_pass": last.tokens_per_pass} if spec else {}
        typer.echo(json.dumps({"text": "".join(r.text for r in responses), "prompt_tokens": tokenizer.encode(prompt),
                               "tokens": [r.token for r in responses], "finish_reason": last.finish_reason,
                               "prompt_tps": last.prompt_tps, "generation_tps": last.generation_tps,
                               "peak_memory_gb": last.peak_memory, **drafts}, ensure_ascii=False))
        return
    typer.echo()
    drafts = (f" | {100 * last.acceptance_rate:.0f}% of drafts accepted, {last.tokens_per_pass:.2f} tokens/pass"
              if spec else "")
    typer.echo(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | generation: "
               f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s{drafts} | peak memory "
               f"{last.peak_memory:.2f} GB | {last.finish_reason}", err=True)


@app.command("chat")
def chat_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Converted model folder, or a repo id (converted on "
                                                             "first use).")],
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None, chat_template: ChatTemplate = None,
    temp: Temp = 0.0, top_p: TopP = 1.0, top_k: TopK = 0, min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = None, seed: Seed = None, max_tokens: MaxTokens = 256,
    draft_model: DraftModel = None, num_draft_tokens: NumDraftTokens = 3, prompt_lookup: PromptLookup = None,
    adapter_path: AdapterPath = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Per turn: tokens prefilled, speeds.")] = False,
) -> None:
    """Chat in the terminal; the KV cache is kept across turns (/help lists the commands)."""
    from mlx_openelm import load, make_logits_processors, make_sampler
    from mlx_openelm.chat import ChatSession
    from mlx_openelm.chat_terminal import run_chat
    from mlx_openelm.hub import generation_options

    sampler, processors = make_sampler(temp, top_p, top_k, min_p, seed), make_logits_processors(repetition_penalty)
    spec = generation_options(model, max_tokens, draft_model, num_draft_tokens, prompt_lookup)
    session = ChatSession(*load(model, chat_template=chat_template, adapter_path=adapter_path), system=system,
                          **spec)
    run_chat(session, verbose=verbose, banner=f"chatting with {model}: /help for commands, Ctrl-D to leave",
             max_tokens=max_tokens, sampler=sampler, logits_processors=processors)


@app.command("serve")
def serve_command(
    model: ModelName,
    host: Annotated[str, typer.Option(help="Address to listen on (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together at most.")] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests waiting at most (then 503).")] = 32,
    api_key: Annotated[str | None, typer.Option(help="Require Authorization: Bearer KEY.", envvar=
                                                "MLX_OPENELM_API_KEY")] = None,
    draft_model: DraftModel = None, num_draft_tokens: NumDraftTokens = 3, adapter_path: AdapterPath = None,
    chat_template: ChatTemplate = None,
) -> None:
    """An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models, /health, /tokenize,
    /detokenize)."""
    from mlx_openelm.server import serve

    serve(model, host=host, port=port, max_batch=max_batch, max_queue=max_queue, api_key=api_key,
          draft_model=draft_model, num_draft_tokens=num_draft_tokens, adapter_path=adapter_path,
          chat_template=chat_template)
    # The server has shut down cleanly. Skip the interpreter's teardown: MLX's per-thread C++ state of the
    # finished scheduler thread can be destroyed during it, which needs the GIL and aborts the process (SIGABRT,
    # measured in about 1 of 5 stops on mlx 0.32). Nothing is left to flush but the standard streams.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command("perplexity")
def perplexity_command(
    model: ModelName,
    data: Annotated[Path, typer.Option(help="A text or JSONL (text field) file, or a folder of them.")],
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    stride: Annotated[int | None, typer.Option(help="Window start step; overlap is context only (default: seq-len)."
                                               )] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4, dtype: JobDtype = "auto",
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures to this JSON file.")] = None,
) -> None:
    """Token-weighted perplexity over a corpus; under mlx.launch the windows are shared among processes."""
    from mlx_openelm import load
    from mlx_openelm.bench import write_json
    from mlx_openelm.jobs.perplexity import check_job, perplexity

    folder = check_job(model, data, seq_len=seq_len, stride=stride, batch_size=batch_size, json_path=json_path)
    net, tokenizer = load(folder, dtype=dtype)
    main_rank = _main_rank()
    with progress_bar("scoring windows", main_rank) as update:
        result = perplexity(net, tokenizer, data, seq_len=seq_len, stride=stride, batch_size=batch_size,
                            progress=update)
    if main_rank:
        typer.echo(result.summary())
        if json_path:
            write_json(json_path, {"model": model, "data": str(data), **result.to_dict()})


@app.command("batch")
def batch_command(
    model: ModelName,
    input_path: Annotated[Path, typer.Option("--input", help="JSONL: prompt or messages per line (id, max_tokens, "
                                                             "temperature, seed, stop optional).")],
    output: Annotated[Path, typer.Option(help="JSONL results, one per input line; a rerun skips ids already in "
                                              "it.")],
    temp: Temp = 0.0, top_p: TopP = 1.0, top_k: TopK = 0, min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = None, seed: Seed = None, max_tokens: MaxTokens = 256,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together.")] = 8, dtype: JobDtype = "auto",
) -> None:
    """Generate for every prompt of a JSONL file, in batches; under mlx.launch the prompts are shared."""
    from mlx_openelm import load
    from mlx_openelm.jobs.batch_generate import batch_generate, check_job

    defaults = {"max_tokens": max_tokens, "temperature": temp, "top_p": top_p, "top_k": top_k, "min_p": min_p,
                "seed": seed, "repetition_penalty": repetition_penalty}
    net, tokenizer = load(check_job(model, input_path, defaults), dtype=dtype)
    main_rank = _main_rank()
    with progress_bar("generating", main_rank) as update:
        counts = batch_generate(net, tokenizer, input_path, output, batch_size=batch_size, defaults=defaults,
                                progress=update)
    if main_rank:
        typer.echo(f"wrote {counts['written']} results to {output} ({counts['skipped']} already there), "
                   f"{counts['completion_tokens']} tokens generated on {counts['ranks']} process(es)")


@app.command("eval")
def eval_command(
    model: ModelName,
    tasks: Annotated[str | None, typer.Option(help="lm-eval tasks, comma-separated (default: the paper's seven: "
                                                   "arc_challenge,arc_easy,boolq,hellaswag,piqa,sciq,winogrande).")]
    = None,
    include_path: Annotated[Path | None, typer.Option(help="A folder of your own task YAMLs.")] = None,
    limit: Annotated[float | None, typer.Option(help="Examples per task (below 1: a fraction).")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="Few-shot examples (default: each task's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8, dtype: JobDtype = "auto",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the results to this JSON file.")]
    = None,
) -> None:
    """Zero-shot (or few-shot) accuracy on lm-evaluation-harness tasks, beside Apple's published figures."""
    from rich.console import Console
    from rich.table import Table

    from mlx_openelm import load
    from mlx_openelm.bench import write_json
    from mlx_openelm.evaluate import check_job, evaluate, results_table

    names, manager = check_job(tasks, include_path, output)
    net, tokenizer = load(model, dtype=dtype)
    with progress_bar("evaluating") as update:
        results = evaluate(net, tokenizer, names, manager, limit=limit, num_fewshot=num_fewshot,
                           batch_size=batch_size, progress=lambda what, done, total: update(done, total, what))
    headers, rows = results_table(results, model)
    table = Table(*headers)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if output:
        write_json(output, {"model": model, **results})
        typer.echo(f"wrote {output}")


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
