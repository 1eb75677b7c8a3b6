"""The command line: a thin typer app."""

from evidrift.cli.app import app

__all__ = ["app"]
