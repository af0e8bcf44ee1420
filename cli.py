"""The ``mlx-openelm`` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import sys

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
