"""What every command shares: the consoles, the one place user-facing errors become exit code 2
(``user_errors``), and small printing helpers.

Only ``EvidriftError`` (core.errors) is a user-facing error: its message names the file, key or value and the
fix, and it is printed as one ``error:`` line with exit code 2. Every other exception is a bug or an
environment failure and keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console

from evidrift.core.errors import EvidriftError

console = Console()
err_console = Console(stderr=True)

P = ParamSpec("P")
R = TypeVar("R")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a user-facing error on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def user_errors(command: Callable[P, R]) -> Callable[P, R]:
    """``command`` with every ``EvidriftError`` printed as one ``error:`` line and exit code 2."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except EvidriftError as exc:
            raise fail(str(exc)) from None

    return run


def training_logs() -> None:
    """One INFO line per epoch on stderr unless the application configured logging itself."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def ci_text(mean: float, low: float, high: float) -> str:
    """``0.812 [0.760, 0.860]``."""
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"
