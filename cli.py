"""The ``mlx-openelm`` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

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

# Errors a user can fix: printed as one line, exit code 1, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


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


def main() -> None:
    """Console-script entry point: user errors become one line and a non-zero exit."""
    try:
        app()
    except USER_ERRORS as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
