"""The ``evidrift`` command line (typer). Thin: parses arguments, calls the library, prints.

Each command lives in its own marked section below; commands import their library modules lazily so that
``evidrift --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="evidrift",
    help="Did fine-tuning change the visual evidence an image classifier relies on? "
    "Explanation drift between checkpoints, offline by default.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a user-facing error on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        from evidrift import __version__

        console.print(__version__)
        raise typer.Exit(0)


# --- validate (config) ---------------------------------------------------------------------------------------
@app.command()
def validate(study: Annotated[Path, typer.Argument(help="study.yaml to check")]) -> None:
    """Validate a study file and print the resolved config (every default filled in) with its hash."""
    from evidrift.config import ConfigError, dump_yaml, load_config

    try:
        config = load_config(study)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    console.print(dump_yaml(config), highlight=False, markup=False)


# --- phantoms (data) -----------------------------------------------------------------------------------------

# --- train / evaluate (models, train) ------------------------------------------------------------------------

# --- explain (cam) -------------------------------------------------------------------------------------------

# --- drift (metrics, stats) ----------------------------------------------------------------------------------

# --- run / demo / compare / report (study) -------------------------------------------------------------------

# --- probe / sanity (probing) --------------------------------------------------------------------------------
