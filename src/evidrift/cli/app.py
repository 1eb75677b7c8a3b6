"""The ``evidrift`` command line (typer). Thin: parses arguments, calls the library, prints.

One module per command group — ``steps`` (validate, phantoms, train, evaluate, explain, drift: the drift
study's steps one by one), ``study`` (run, demo, report), ``compare``, ``probe`` (probe, sanity) — each
importing its library modules lazily so that ``evidrift --help`` stays fast. Every command is registered here
through ``output.user_errors``: an ``EvidriftError`` exits with code 2 and one ``error:`` line; anything else
keeps its traceback.
"""

from __future__ import annotations

from typing import Annotated

import typer

from evidrift.cli import compare, diffusion, probe, steps, study
from evidrift.cli.output import console, user_errors

app = typer.Typer(
    name="evidrift",
    help="Did fine-tuning change the visual evidence an image classifier relies on? "
    "Explanation drift between checkpoints, offline by default.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        from evidrift import __version__

        console.print(__version__)
        raise typer.Exit(0)


COMMANDS = (
    steps.validate,
    steps.phantoms,
    steps.train,
    steps.evaluate,
    steps.explain,
    steps.drift,
    study.run,
    study.demo,
    compare.compare,
    study.report,
    probe.probe,
    probe.sanity,
    diffusion.diffusion,
)
for command in COMMANDS:
    app.command()(user_errors(command))
